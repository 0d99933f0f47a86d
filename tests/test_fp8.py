"""Quantised checkpoints load, kept as stored or (`dequantize=True`) dequantised one tensor at a time: FP8 e4m3
with block scales (DeepSeek V3, V3.2: `weight_scale_inv`; V4: ue8m0 `.scale`) and V4's FP4-packed routed experts.
tests/test_quantised.py compares the two ways of holding them."""

import json
import re
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


FAMILIES = {"v3": lambda: tf.DeepseekV3Config(**CONFIG),
            "v3.2": lambda: tf.DeepseekV32Config(**CONFIG, index_topk=4, index_head_dim=16, index_n_heads=16)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fp8_pair(request, tmp_path_factory):
    """(fp8 folder, float folder holding exactly the dequantised weights), for V3 and V3.2."""
    src = tmp_path_factory.mktemp("src")
    make_checkpoint(FAMILIES[request.param](), src)
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
    model = wb.load(fp8, dequantize=True)
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


# ---------------------------------------------------------------- DeepSeek-V4: FP8 (ue8m0 `.scale`) and FP4 experts

from test_deepseek_v4 import CONFIGS as V4_CONFIGS, VOCAB as V4_VOCAB, make_v4  # noqa: E402
from workbench.quant import FP4_VALUES, dequant_fp4  # noqa: E402

V4_FP8 = re.compile(r".*attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight|.*shared_experts\.w\d\.weight")
V4_FP4 = re.compile(r".*ffn\.experts\.\d+\.w\d\.weight")


def ue8m0(x: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales at or above x (what an e8m0 byte can hold)."""
    return torch.exp2(torch.ceil(torch.log2(x.clamp(min=2**-100)))).to(torch.float8_e8m0fnu)


def quantise_fp8_ue8m0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = -(-w.shape[0] // BLOCK[0]), -(-w.shape[1] // BLOCK[1])
    amax = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            amax[i, j] = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]].abs().max()
    scale = ue8m0(amax / 448)
    full = scale.float().repeat_interleave(BLOCK[0], 0)[: w.shape[0]].repeat_interleave(BLOCK[1], 1)[:, : w.shape[1]]
    return (w / full).to(torch.float8_e4m3fn), scale


def quantise_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in groups of 32 inputs: power-of-two scale, nearest e2m1 code, two codes per byte (low nibble first)."""
    groups = -(-w.shape[1] // 32)
    amax = torch.stack([w[:, g * 32:(g + 1) * 32].abs().amax(1) for g in range(groups)], dim=1)
    scale = ue8m0(amax / 6)
    x = w / scale.float().repeat_interleave(32, 1)[:, : w.shape[1]]
    values = torch.tensor(FP4_VALUES)
    codes = (x[..., None] - values).abs().argmin(-1).to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8), scale


def test_fp4_unpacking_is_exact():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4)).view(torch.int8)[None]
    assert dequant_fp4(packed, torch.ones(1, 1)).tolist() == [list(FP4_VALUES)]


@pytest.fixture(scope="module")
def v4_quantised(tmp_path_factory):
    """(quantised folder with official names, float folder holding exactly the dequantised weights)."""
    src = tmp_path_factory.mktemp("v4")
    config, _ = V4_CONFIGS["hc2-every-kind-rates-not-dividing-yarn"]
    make_v4(config(), src)
    q, ref = tmp_path_factory.mktemp("v4q"), tmp_path_factory.mktemp("v4deq")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k.replace("model.embed_tokens.", "embed.").removeprefix("model."): f.get_tensor(k) for k in f.keys()}
    quant, deq = {}, {}
    for name, t in tensors.items():
        base = name.removesuffix("weight")
        if V4_FP8.fullmatch(name):
            quant[name], quant[base + "scale"] = quantise_fp8_ue8m0(t)
            deq[name] = dequant_fp8(quant[name], quant[base + "scale"], BLOCK)
        elif V4_FP4.fullmatch(name):
            quant[name], quant[base + "scale"] = quantise_fp4(t)
            deq[name] = dequant_fp4(quant[name], quant[base + "scale"])
        else:
            quant[name] = deq[name] = t
    assert sum(t.dtype == torch.int8 for t in quant.values()) == 4 * 6 * 3  # every routed expert is FP4
    assert sum(t.dtype == torch.float8_e4m3fn for t in quant.values()) > 20
    save_file(quant, str(q / "model.safetensors"))
    save_file(deq, str(ref / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (ref / "config.json").write_text(json.dumps(cfg))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                  "weight_block_size": list(BLOCK), "expert_dtype": "fp4"}
    (q / "config.json").write_text(json.dumps(cfg))
    return q, ref, tensors


def test_v4_fp8_fp4_equals_dequantise_then_run(v4_quantised):
    q, ref, original = v4_quantised
    ids = input_ids(V4_VOCAB)
    model = wb.load(q, dequantize=True)
    a, cache_a = model.run_with_cache(ids, names=["layers.*.router.topk_ids"])
    b, cache_b = wb.load(ref).run_with_cache(ids, names=["layers.*.router.topk_ids"])
    assert torch.equal(a, b) and all(torch.equal(cache_a[n], cache_b[n]) for n in cache_a)
    w, w0 = model.layers["1"].ffn.experts.down_proj[2], original["layers.1.ffn.experts.2.w2.weight"]
    assert not torch.equal(w, w0) and ((w - w0).abs() <= w0.abs().amax(1, keepdim=True) / 3).all()  # half a step


@pytest.mark.parametrize("name, bad, message", [
    ("layers.1.ffn.experts.0.w1.scale", lambda s: s[:, :0], r"FP4 scale F8_E8M0\[16, 0\] does not fit weight \[16, 32\]"),
    ("layers.0.attn.wq_b.scale", lambda s: torch.ones(9, 9), r"FP8 scale F32\[9, 9\] does not fit"),
    ("layers.0.attn.wq_b.scale", lambda s: torch.full(s.shape, float("nan")), "scales must be finite"),
    ("layers.2.ffn.experts.1.w2.scale", lambda s: torch.full(s.shape, 255, dtype=torch.uint8).view(s.dtype),
     "scales must be finite"),  # 0xFF is e8m0's NaN
])
def test_v4_corrupt_scale(v4_quantised, tmp_path, name, bad, message):
    q = v4_quantised[0]
    shutil.copytree(q, tmp_path, dirs_exist_ok=True)
    with safe_open(str(q / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    t[name] = bad(t[name])
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(wb.CheckpointError, match=message) as err:
        wb.load(tmp_path)
    assert name in str(err.value)
