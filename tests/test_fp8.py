"""FP8 e4m3 block-scaled checkpoints (DeepSeek V3 layout) load by dequantising each tensor on the fly."""

import json
import shutil

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file

import workbench as wb
from oracle import input_ids, make_checkpoint
from workbench.quant import dequant_fp8

BLOCK = (16, 12)  # small blocks so the tiny weights span several, with padded edge blocks
CONFIG = dict(vocab_size=96, hidden_size=40, intermediate_size=56, moe_intermediate_size=20, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
              n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=256)
NOT_FP8 = ("embed_tokens", "lm_head", "norm", "layernorm", ".gate.", "bias")


def quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise e4m3 quantisation: scale = block amax / 448, stored as the multiplier `weight_scale_inv`."""
    rows, cols = -(-w.shape[0] // BLOCK[0]), -(-w.shape[1] // BLOCK[1])
    scale = torch.empty(rows, cols)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448
            q[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]] = (blk / scale[i, j]).to(q.dtype)
    return q, scale


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(fp8 folder, float folder holding exactly the dequantised weights)."""
    src = tmp_path_factory.mktemp("v3")
    make_checkpoint(tf.DeepseekV3Config(**CONFIG), src)
    fp8, ref = tmp_path_factory.mktemp("fp8"), tmp_path_factory.mktemp("deq")
    for d in (fp8, ref):
        shutil.copytree(src, d, dirs_exist_ok=True)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    quant, deq = {}, {}
    for name, t in tensors.items():
        if t.dim() == 2 and not any(s in name for s in NOT_FP8):
            q, s = quantise(t)
            quant[name], quant[name + "_scale_inv"] = q, s
            deq[name] = dequant_fp8(q, s, BLOCK)
        else:
            quant[name] = deq[name] = t
    assert sum(t.dtype == torch.float8_e4m3fn for t in quant.values()) > 20
    save_file(quant, str(fp8 / "model.safetensors"))
    save_file(deq, str(ref / "model.safetensors"))
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                                  "activation_scheme": "dynamic"}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    return fp8, ref, tensors


def test_fp8_equals_dequantise_then_run(fp8_pair):
    fp8, ref, _ = fp8_pair
    ids = input_ids(96)
    a, cache_a = wb.load(fp8).run_with_cache(ids, names=["layers.*.router.topk_ids"])
    b, cache_b = wb.load(ref).run_with_cache(ids, names=["layers.*.router.topk_ids"])
    assert torch.equal(a, b)
    assert all(torch.equal(cache_a[n], cache_b[n]) for n in cache_a)


def test_dequantisation_is_close_to_the_original(fp8_pair):
    """The block scale is a multiplier: dequantised weights stay within e4m3 precision of the originals."""
    fp8, _, original = fp8_pair
    model = wb.load(fp8)
    w = model.layers["1"].ffn.experts.gate_proj[3]
    ref = original["model.layers.1.mlp.experts.3.gate_proj.weight"]
    assert not torch.equal(w, ref)
    assert ((w - ref).abs() <= ref.abs() * 2**-3 + 1e-6).all()


def test_fp8_bad_scale_and_missing_config(fp8_pair, tmp_path):
    fp8 = fp8_pair[0]
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    with safe_open(str(bad / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    t["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(wb.CheckpointError, match="o_proj.weight_scale_inv: FP8 scale F32\\[1, 1\\] does not fit"):
        wb.load(bad)
    plain = tmp_path / "plain"
    shutil.copytree(fp8, plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(wb.CheckpointError, match="quantised weights of this kind are not supported"):
        wb.load(plain)
