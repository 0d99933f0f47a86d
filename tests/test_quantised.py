"""Quantised weights kept as stored (`workbench.load`'s default) against dequantise-then-run (`dequantize=True`),
on tiny checkpoints written here in the published layouts: DeepSeek-V3 FP8 (`weight_scale_inv`), DeepSeek-V4 FP8
(ue8m0 `.scale`) with FP4 routed experts, and GPT-OSS with MXFP4 experts (`_blocks` / `_scales`). Dequantisation
is checked against transformers' own unpackers, GPT-OSS against the transformers oracle on the same weights."""

import json
import re
import shutil

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import workbench as wb
from oracle import assert_close_scaled, assert_parity, input_ids, make_checkpoint, routing_is_nontrivial
from test_deepseek_v4 import VOCAB as V4_VOCAB
from test_fp8 import NOT_FP8, quantise_fp4, ue8m0, v4_quantised  # noqa: F401  (v4_quantised: fixture)
from test_plan import as_rank
from workbench import checkpoint, quant
from workbench.interventions import ablate, force, patch, scale_router_logits
from workbench.models import deepseek, deepseek_v4, gpt_oss
from workbench.models.base import map_tensor
from workbench.models.layers import BlockFP8Linear
from workbench.plan import census

VOCAB = 96
BLOCK = (16, 64)  # the fused kernels need the FP8 block's input side to be a multiple of their K tile (64 in fp32)
V3 = dict(vocab_size=VOCAB, hidden_size=160, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3,
          num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
          qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
          n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=256)
GPT_OSS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=6, num_experts_per_tok=2, sliding_window=4,
               max_position_embeddings=4096, rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                                                   beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                                   original_max_position_embeddings=4096))


def mxfp4_quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, out, in] -> MXFP4 blocks uint8 [E, out, in / 32, 16] and e8m0 exponents uint8 [E, out, in / 32]."""
    E, out, n = w.shape
    packed, scale = quantise_fp4(w.reshape(E * out, n))
    return packed.view(torch.uint8).view(E, out, n // 32, 16), scale.view(torch.uint8).view(E, out, n // 32)


@pytest.fixture(scope="module")
def v3_fp8(tmp_path_factory):
    """A tiny DeepSeek-V3 whose linears (attention, dense MLP, shared and routed experts) are FP8 as published."""
    folder = tmp_path_factory.mktemp("v3fp8")
    make_checkpoint(tf.DeepseekV3Config(**V3), folder)
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2 and not any(s in name for s in NOT_FP8):
            out[name], out[name + "_scale_inv"] = quant.quantise_fp8(t, BLOCK)
        else:
            out[name] = t
    save_file(out, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                                  "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    """(folder, oracle): a tiny GPT-OSS with MXFP4 experts as published, and the transformers model holding the
    weights transformers' own unpacker makes of them."""
    folder = tmp_path_factory.mktemp("gptoss")
    hf = make_checkpoint(tf.GptOssConfig(**GPT_OSS), folder)
    tensors = load_file(folder / "model.safetensors")
    for i, layer in enumerate(hf.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        for name in ("gate_up_proj", "down_proj"):  # stored [E, in, out] (right-multiplied): quantise [E, out, in]
            blocks, scales = mxfp4_quantise(tensors.pop(prefix + name).transpose(1, 2))
            tensors[prefix + name + "_blocks"], tensors[prefix + name + "_scales"] = blocks, scales
            getattr(layer.mlp.experts, name).data = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, hf


CHECKPOINTS = {"v3-fp8": VOCAB, "v4-fp8-fp4": V4_VOCAB, "gpt-oss-mxfp4": VOCAB}


@pytest.fixture
def quantised(request):
    """name -> the checkpoint folder."""
    def get(name: str):
        if name == "v3-fp8":
            return request.getfixturevalue("v3_fp8")
        if name == "v4-fp8-fp4":
            return request.getfixturevalue("v4_quantised")[0]
        return request.getfixturevalue("gpt_oss_mxfp4")[0]
    return get


def expert_sets(cache: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.sort(-1).values for n, t in cache.items() if n.endswith("topk_ids")}


@pytest.mark.parametrize("backend", ["torch", "grouped", "triton"])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_kept_equals_dequantise_then_run(quantised, name, backend):
    """The same forward, weights kept quantised or dequantised on load: identical on the CPU backends (the same
    dequantised values, rounded once, in the same operations), within 1e-4 through the fused kernels."""
    folder, vocab = quantised(name), CHECKPOINTS[name]
    ids = input_ids(vocab)
    kept = wb.load(folder, dtype=torch.float32, backend=backend)
    deq = wb.load(folder, dtype=torch.float32, backend=backend, dequantize=True)
    a, cache_a = kept.run_with_cache(ids, names=["layers.*.router.topk_ids"])
    b, cache_b = deq.run_with_cache(ids, names=["layers.*.router.topk_ids"])
    assert_close_scaled(a, b, 1e-4, f"{name} {backend} logits")
    assert expert_sets(cache_a).keys() == expert_sets(cache_b).keys() and routing_is_nontrivial(cache_a)
    assert all(torch.equal(s, expert_sets(cache_b)[n]) for n, s in expert_sets(cache_a).items())
    if backend != "triton":
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "grouped"])
def test_kept_equals_dequantised_in_bf16(v4_quantised, backend):  # noqa: F811
    """In bf16 too: each value is rounded once from the fp32 product, as dequantising on load rounds it."""
    ids = input_ids(V4_VOCAB)
    kept = wb.load(v4_quantised[0], dtype=torch.bfloat16, backend=backend)
    deq = wb.load(v4_quantised[0], dtype=torch.bfloat16, backend=backend, dequantize=True)
    assert torch.equal(kept(ids), deq(ids))


# ---------------------------------------------------------------- against transformers' unpackers


def ours(model, rules, name: str) -> torch.Tensor:
    """Our model's fp32 weight for checkpoint weight `name` (dequantised by the module that holds it)."""
    (target, slot), *_ = map_tensor(rules, name)[0]
    module = model.get_submodule(target.rpartition(".")[0])
    if isinstance(module, BlockFP8Linear):
        return module.dequantized(torch.float32)
    return module.weight(target.rpartition(".")[2], slot, torch.empty(0)).clone()


def test_fp8_dequantisation_matches_transformers(v3_fp8):
    """Every FP8 weight of the V3 checkpoint, as our model dequantises it, equals transformers' block
    dequantisation (`finegrained_fp8`) of the stored codes and scales."""
    model = wb.load(v3_fp8)
    rules = deepseek.rules(model.config)
    checked = 0
    with safe_open(str(v3_fp8 / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if name.endswith("_scale_inv"):
                continue
            t = f.get_tensor(name)
            if t.dtype == torch.float8_e4m3fn:
                want = _dequantize_fp8_weight(t, f.get_tensor(name + "_scale_inv"), list(BLOCK), torch.float32)
                assert torch.equal(ours(model, rules, name), want), name
                checked += 1
    assert checked == 3 * 5 + 3 + 2 * (3 * 8 + 3)  # attention x3 layers, dense MLP, MoE layers: experts + shared


def test_v4_dequantisation_matches_transformers(v4_quantised):  # noqa: F811
    """V4's FP8 linears (ue8m0 block scales) and FP4 experts (e2m1 pairs, ue8m0 per 32 inputs) against
    transformers' `Fp8Dequantize` and `_dequantize_fp8_weight`."""
    folder = v4_quantised[0]
    model = wb.load(folder)
    rules, unpack = deepseek_v4.rules(model.config), Fp8Dequantize(None)
    kinds = {"fp8": 0, "fp4": 0}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            scale = name.removesuffix("weight") + "scale"
            if t.dtype == torch.float8_e4m3fn:
                want, kind = _dequantize_fp8_weight(t, f.get_tensor(scale), [16, 12], torch.float32), "fp8"
            elif t.dtype == torch.int8:
                want, kind = unpack._dequantize_one(t, f.get_tensor(scale), torch.float32), "fp4"
            else:
                continue
            assert torch.equal(ours(model, rules, name), want), name
            kinds[kind] += 1
    assert kinds == {"fp8": 4 * 5 + 2 + 4 * 3, "fp4": 4 * 6 * 3}  # attention, CSA indexers, shared; experts


def test_mxfp4_dequantisation_matches_transformers(gpt_oss_mxfp4):
    """GPT-OSS's MXFP4 experts as our model holds them (gate and up rows split from the interleaved gate_up) equal
    transformers' `convert_moe_packed_tensors` of the stored blocks and scales."""
    folder, _ = gpt_oss_mxfp4
    model = wb.load(folder)
    stored = load_file(folder / "model.safetensors")
    for i in range(GPT_OSS["num_hidden_layers"]):
        ex, p = model.layers[str(i)].ffn.experts, f"model.layers.{i}.mlp.experts."
        gate_up, down = (convert_moe_packed_tensors(stored[p + n + "_blocks"], stored[p + n + "_scales"],
                                                    dtype=torch.float32).transpose(1, 2)
                         for n in ("gate_up_proj", "down_proj"))
        for e in range(GPT_OSS["num_local_experts"]):
            x = torch.empty(0)
            assert torch.equal(ex.weight("gate_proj", e, x), gate_up[e, 0::2])
            assert torch.equal(ex.weight("up_proj", e, x), gate_up[e, 1::2])
            assert torch.equal(ex.weight("down_proj", e, x), down[e])


def test_gpt_oss_mxfp4_matches_the_oracle(gpt_oss_mxfp4):
    """GPT-OSS as published loads with its experts kept MXFP4 and matches transformers run on the same weights."""
    folder, hf = gpt_oss_mxfp4
    out = assert_parity(folder, hf, VOCAB, backend="grouped")
    assert routing_is_nontrivial(out["cache"])
    assert out["model"].layers["0"].ffn.experts.gate_proj.dtype == torch.uint8


# ---------------------------------------------------------------- what the model holds


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_memory_is_what_the_checkpoint_stores(quantised, name):
    """Kept quantised, the model's parameters and buffers take at most 1.25x the checkpoint's tensor bytes (FP8
    scales become fp32), and less than dequantised."""
    folder = quantised(name)
    stored = sum(i.offsets[1] - i.offsets[0] for i in checkpoint.weight_files(folder).values())
    kept = tensor_bytes(wb.load(folder))
    assert kept <= 1.25 * stored
    assert kept < tensor_bytes(wb.load(folder, dequantize=True))


def test_state_dict_shows_codes_and_scales(v3_fp8, v4_quantised, gpt_oss_mxfp4):  # noqa: F811
    """FP8 codes with fp32 block scales, FP4 codes (two per byte) with e8m0 exponents, as stored."""
    sd = wb.load(v3_fp8).state_dict()
    E, I, H = V3["n_routed_experts"], V3["moe_intermediate_size"], V3["hidden_size"]
    disk = load_file(v3_fp8 / "model.safetensors")
    assert sd["layers.1.ffn.experts.gate_proj"].dtype == torch.float8_e4m3fn
    assert sd["layers.1.ffn.experts.gate_proj"].shape == (E, I, H)
    assert sd["layers.1.ffn.experts.gate_proj_scale"].dtype == torch.float32
    assert sd["layers.1.ffn.experts.gate_proj_scale"].shape == (E, 3, 3)  # ceil(48 / 16), ceil(160 / 64)
    assert sd["layers.1.ffn.experts.down_proj_scale"].shape == (E, 10, 1)
    assert torch.equal(sd["layers.2.ffn.experts.down_proj"][5].view(torch.uint8),
                       disk["model.layers.2.mlp.experts.5.down_proj.weight"].view(torch.uint8))
    assert torch.equal(sd["layers.2.ffn.experts.down_proj_scale"][5],
                       disk["model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"])
    assert sd["layers.0.attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert sd["layers.0.attn.q_a_proj.weight_scale"].shape == (2, 3)
    assert sd["layers.0.ffn.gate_proj.weight"].dtype == torch.float8_e4m3fn  # the dense MLP
    assert sd["embed.weight"].dtype == sd["lm_head.weight"].dtype == sd["layers.1.ffn.router.weight"].dtype

    sd = wb.load(v4_quantised[0]).state_dict()
    assert sd["layers.1.ffn.experts.gate_proj"].dtype == torch.uint8
    assert sd["layers.1.ffn.experts.gate_proj"].shape == (6, 16, 16)  # [E, I, H / 2]
    assert sd["layers.1.ffn.experts.gate_proj_scale"].dtype == torch.uint8
    assert sd["layers.1.ffn.experts.gate_proj_scale"].shape == (6, 16, 1)  # [E, I, H / 32]
    assert sd["layers.1.attn.wo_b.weight_scale"].dtype == torch.float32  # ue8m0 made fp32 on load
    assert sd["layers.1.ffn.shared.down_proj.weight"].dtype == torch.float8_e4m3fn

    folder, _ = gpt_oss_mxfp4
    sd, disk = wb.load(folder).state_dict(), load_file(folder / "model.safetensors")
    blocks, scales = (disk[f"model.layers.1.mlp.experts.gate_up_proj_{k}"] for k in ("blocks", "scales"))
    assert torch.equal(sd["layers.1.ffn.experts.up_proj"], blocks[:, 1::2].flatten(-2))
    assert torch.equal(sd["layers.1.ffn.experts.up_proj_scale"], scales[:, 1::2])
    assert sd["layers.1.ffn.experts.down_proj"].shape == (6, 64, 16)  # [E, H, I / 2]
    assert sd["layers.1.ffn.experts.up_bias"].dtype == torch.float32


def test_dequantize_true_holds_floats(v4_quantised):  # noqa: F811
    model = wb.load(v4_quantised[0], dequantize=True)
    assert not any(isinstance(m, BlockFP8Linear) for m in model.modules())
    assert all(p.dtype in (torch.float32, torch.int64) for p in model.parameters())


@pytest.mark.parametrize("backend", ["torch", "grouped"])
def test_hooks_and_interventions_as_on_the_dequantised_model(v3_fp8, backend):
    """Every hook point, an edit of the per-expert hidden states and the interventions give on the kept model exactly
    what they give on the dequantised one."""
    ids = input_ids(VOCAB)
    kept = wb.load(v3_fp8, backend=backend)
    deq = wb.load(v3_fp8, backend=backend, dequantize=True)
    a, cache_a = kept.run_with_cache(ids)
    b, cache_b = deq.run_with_cache(ids)
    assert torch.equal(a, b) and cache_a.keys() == cache_b.keys()
    assert all(torch.equal(cache_a[n], cache_b[n]) for n in cache_a)
    hooks = [{"layers.1.experts.hidden": lambda x, ctx: x * 0.5},
             ablate(1, [3]), ablate(2, [0, 5], mode="reroute"), force(2, [1, 4], tokens=range(3, 9)),
             scale_router_logits(1, 2.0), patch("layers.2.experts.out", cache_b["layers.2.experts.out"] * 2)]
    for h in hooks:
        with kept.hooks(h):
            x = kept(ids)
        with deq.hooks(h):
            y = deq(ids)
        assert torch.equal(x, y) and not torch.equal(x, a)


def test_gradients_flow_through_kept_weights(v4_quantised):  # noqa: F811
    """With autograd recording (attribution), each expert's dequantised weight is a tensor of its own: gradients
    equal those of the dequantised model."""
    ids = input_ids(V4_VOCAB)
    grads = []
    for dequantize in (False, True):
        model = wb.load(v4_quantised[0], dequantize=dequantize)
        seen = {}

        def keep(x, ctx):
            x.requires_grad_(True)
            seen["x"] = x
            return x

        with model.hooks({"layers.1.resid_mid": keep}):
            model(ids).logsumexp(-1).sum().backward()
        grads.append(seen["x"].grad)
    assert torch.equal(*grads)


# ---------------------------------------------------------------- loading


def test_nan_codes_are_refused(v3_fp8, tmp_path):
    shutil.copytree(v3_fp8, tmp_path, dirs_exist_ok=True)
    t = load_file(v3_fp8 / "model.safetensors")
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    t[name].view(torch.uint8)[3, 4] = 0x7F  # e4m3's NaN
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(wb.CheckpointError, match=f"{re.escape(name)}: weights contain NaN"):
        wb.load(tmp_path)
    with pytest.raises(wb.CheckpointError, match=f"{re.escape(name)}: weights contain NaN"):
        wb.load(tmp_path, dequantize=True)


def test_mxfp4_scale_must_fit(gpt_oss_mxfp4, tmp_path):
    folder, _ = gpt_oss_mxfp4
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    t = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj_scales"
    t[name] = t[name][:, :, :0]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(wb.CheckpointError, match=rf"{name}: MXFP4 scale U8\[6, 64, 0\] does not fit weight "
                                                 r"\[6, 64, 32\] with groups of 32 inputs"):
        wb.load(tmp_path)
    t[name] = torch.full((6, 64, 1), 255, dtype=torch.uint8)  # e8m0's NaN
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(wb.CheckpointError, match=f"{name}: scales must be finite"):
        wb.load(tmp_path)


@pytest.mark.parametrize("world_size, group", [(2, 1), (2, 2), (6, 2)])
def test_ranks_hold_their_part_of_the_codes(v4_quantised, world_size, group):  # noqa: F811
    """Expert and tensor parallelism on kept weights: each rank holds its experts' codes and its heads' rows or
    columns of the FP8 projections (their scales regridded where a cut splits a block), which dequantise to that
    rank's part of the dequantised weights; memory and reads are what `workbench plan` says."""
    folder = v4_quantised[0]
    whole = wb.load(folder)
    c = census(folder, tensor_parallel=group)
    memory, read = [], []
    for rank in range(world_size):
        with as_rank(rank, world_size):
            kept = wb.load(folder, tensor_parallel=group)
            deq = wb.load(folder, tensor_parallel=group, dequantize=True)
        memory.append(sum(t.numel() * t.element_size() for t in kept.parameters()))
        read.append(kept.load_report["bytes_read"])
        owned = slice(rank * 6 // world_size, (rank + 1) * 6 // world_size)
        for i in "0123":
            ex = kept.layers[i].ffn.experts
            assert torch.equal(ex.down_proj, whole.layers[i].ffn.experts.down_proj[owned])
            assert torch.equal(ex.up_proj_scale, whole.layers[i].ffn.experts.up_proj_scale[owned])
            for p in ("wq_b", "wo_a", "wo_b"):
                linear = kept.get_submodule(f"layers.{i}.attn.{p}")
                assert isinstance(linear, BlockFP8Linear)
                assert torch.equal(linear.dequantized(torch.float32), deq.get_submodule(f"layers.{i}.attn.{p}").weight)
    p = c.at(world_size)
    assert max(memory) == p.memory.total and max(read) == p.disk.total
