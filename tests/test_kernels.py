"""Triton kernels against their PyTorch references: compiled on a CUDA GPU, else on CPU through Triton's
interpreter (conftest sets TRITON_INTERPRET=1 where no GPU is visible; tiny shapes: it is slow).

The interpreter computes bf16 tl.dot on raw bit patterns, so there kernels are checked in fp32 and fp16 (the
one bf16 check covers the kernels' fp32 upcast); bf16 cases are `cuda`-marked and run on a GPU, as do the
model parities per family at the end (bench/gpu_check.py runs them all).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernel tests need it (its interpreter on CPU)")

import workbench as wb  # noqa: E402
import workbench.kernels as K  # noqa: E402
from workbench.errors import KernelError  # noqa: E402
from workbench.hooks import HookRegistry  # noqa: E402
from workbench.models.moe import MoE, Router  # noqa: E402
from workbench.quant import FP4_VALUES  # noqa: E402
from workbench.routing import RouterSpec, router_scores  # noqa: E402
import transformers as tf  # noqa: E402
from oracle import input_ids, make_checkpoint  # noqa: E402
from test_deepseek import v2, v3  # noqa: E402
from test_deepseek_v4 import CONFIGS as V4_CONFIGS, VOCAB as V4_VOCAB, make_v4  # noqa: E402
from test_deepseek_v32 import v32  # noqa: E402
from test_dense_and_mixtral import COMMON as DENSE  # noqa: E402
from test_fp8 import fp8_pair, v4_quantised  # noqa: E402, F401  (fixtures of the quantised-model checks)
from test_gpt_oss import config as gpt_oss  # noqa: E402
from test_qwen_olmoe import olmoe, qwen2, qwen3  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not K.backend.interpreting():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set: nothing runs the kernels", allow_module_level=True)
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
SMALL = K.LaunchConfig(16, 16, 16, 4, 2)  # several K and N tiles on tiny H / I
FP4_SMALL = K.LaunchConfig(16, 16, 32, 4, 2)  # block_k: one FP4 scale group
cuda = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=cuda)]  # bf16: compiled kernels only


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors on the device the kernels run on."""
    return [t.to(DEVICE) for t in tensors]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative agreement at the dtype's tolerance (atol scaled by the largest expected magnitude)."""
    tol = TOL[dtype]
    scale = expected.float().abs().max().item() or 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------- router

ROUTERS = {
    "v3_groups_top2sum": RouterSpec(16, 4, score="sigmoid", correction_bias=True, groups=4, topk_groups=2,
                                    renormalize=True, norm_eps=1e-20, scaling=2.5),
    "v2_groups_max": RouterSpec(12, 3, score="softmax", groups=4, topk_groups=2, group_score="max", scaling=16.0),
    "v4_sqrtsoftplus": RouterSpec(10, 3, score="sqrtsoftplus", correction_bias=True, renormalize=True,
                                  norm_eps=1e-20, scaling=1.5),
    "gpt_oss": RouterSpec(8, 4, score="identity", weight_softmax=True),
    "softmax_renorm_eps": RouterSpec(8, 2, score="softmax", renormalize=True, norm_eps=0.25),
    "qwen_k1": RouterSpec(6, 1, score="softmax"),
    "groups_all_kept": RouterSpec(8, 2, score="sigmoid", correction_bias=True, groups=2, topk_groups=2),
}


def model_route(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None):
    """Ids and weights from the model's own score function, Router.select and Router.weigh."""
    router = Router(4, spec, HookRegistry(), "layers.0")
    if bias is not None:
        router.correction_bias.data = bias
    scores = router_scores(logits, spec.score)
    ids = router.select(scores, torch.zeros(len(logits), dtype=torch.long))
    return ids, router.weigh(scores, ids)


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_route_matches_router(name, ids_dtype):
    spec = ROUTERS[name]
    g = torch.Generator().manual_seed(0)
    # small non-negative integers: many exact ties, and no two different score sums that agree only in exact
    # arithmetic (sigmoid(x) + sigmoid(-x) = 1 would make a tie that rounding may break either way)
    logits = torch.randint(0, 4, (37, spec.experts), generator=g).float()
    logits[0] = 1.0  # a row of all-equal logits: the lowest ids win
    bias = torch.randint(-2, 3, (spec.experts,), generator=g).float() / 4 if spec.correction_bias else None
    device_bias = None if bias is None else bias.to(DEVICE)
    ids, weights = (t.cpu() for t in K.triton_route(logits.to(DEVICE), spec, device_bias, ids_dtype=ids_dtype))
    want_ids, want_weights = model_route(logits, spec, bias)
    assert ids.dtype == ids_dtype and weights.dtype == torch.float32
    assert torch.equal(ids.long(), want_ids)
    close(weights, want_weights, torch.float32)
    ref_ids, ref_weights = K.reference_route(logits, spec, bias)
    assert torch.equal(ref_ids, want_ids) and torch.equal(ref_weights, want_weights)


def test_route_masks_dropped_groups_with_minus_inf():
    """Biased scores below 0 in the kept groups still beat every expert of a dropped group."""
    spec = ROUTERS["v3_groups_top2sum"]
    logits = torch.full((2, 16), -3.0)
    logits[:, 4:8] = 3.0  # group 1 wins outright
    logits[:, 12:16] = 2.0  # group 3 is second
    bias = torch.full((16,), -2.0)  # every biased score is negative
    device_logits, device_bias = on_device(logits, bias)
    ids = K.triton_route(device_logits, spec, device_bias)[0].cpu()
    assert torch.equal(ids, torch.tensor([[4, 5, 6, 7]] * 2))
    assert torch.equal(ids, model_route(logits, spec, bias)[0])


def test_route_dispatch_uses_the_kernel_under_the_interpreter():
    spec = ROUTERS["softmax_renorm_eps"]
    logits = torch.randn(5, 8, device=DEVICE)
    assert K.backend.use_triton(logits)
    ids, weights = K.route(logits, spec, ids_dtype=torch.int32)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), K.reference_route(logits, spec)[0])


# ---------------------------------------------------------------- alignment

def routed_ids(case: str, n: int, k: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Expert ids [n, k] for a named routing pattern (distinct per row except for "all_on_one")."""
    g = torch.Generator().manual_seed(seed)
    if case == "all_on_one":
        return torch.full((n, k), experts - 1)
    if case == "empty_expert":  # expert 0 gets nothing
        return torch.stack([1 + torch.randperm(experts - 1, generator=g)[:k] for _ in range(n)])
    if case == "one_expert":  # every token's first slot on expert 1, the other slots on the other experts
        rest = torch.stack([torch.randperm(experts - 1, generator=g)[: k - 1] for _ in range(n)])
        return torch.cat((torch.ones(n, 1, dtype=torch.long), rest + (rest >= 1)), dim=1)
    return torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])


ALIGN_CASES = [  # (case, N, k, E, block_m)
    ("random", 9, 2, 5, 16),
    ("random", 40, 3, 6, 16),
    ("one_expert", 20, 2, 4, 16),
    ("all_on_one", 33, 1, 3, 16),
    ("empty_expert", 12, 2, 5, 4),
    ("random", 1, 1, 4, 16),  # N * k below one block
    ("all_on_one", 3, 2, 1, 4),  # a single expert, chosen by both slots of every row
]


@pytest.mark.parametrize("case,n,k,experts,block_m", ALIGN_CASES)
def test_align_matches_reference(case, n, k, experts, block_m):
    ids = routed_ids(case, n, k, experts).to(DEVICE)
    got, want = K.triton_align(ids.int(), experts, block_m), K.reference_align(ids, experts, block_m)
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    # the reference itself: each expert's pairs in row-major order, padded with the sentinel to whole blocks
    pairs, block_expert, padded = want.pairs, want.block_expert, int(want.padded)
    flat = ids.flatten()
    assert padded % block_m == 0 and (block_expert[padded // block_m:] == -1).all()
    for b in range(padded // block_m):
        rows = pairs[b * block_m:(b + 1) * block_m]
        real = rows[rows < flat.numel()]
        assert (flat[real.long()] == block_expert[b]).all() and (rows[len(real):] == flat.numel()).all()
    placed = pairs[:padded][pairs[:padded] < flat.numel()].long()
    for e in range(experts):
        assert torch.equal(placed[flat[placed] == e], torch.where(flat == e)[0])


# ---------------------------------------------------------------- fused experts

def expert_weights(experts: int, inter: int, hidden: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """gate, up [E, I, H], down [E, H, I] and biases, scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(experts, inter, hidden, generator=g) / hidden**0.5
    up = torch.randn(experts, inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    biases = (torch.randn(experts, inter, generator=g), torch.randn(experts, inter, generator=g),
              torch.randn(experts, hidden, generator=g))
    return (*(t.to(dtype).to(device) for t in (gate, up, down)), tuple(b.to(dtype).to(device) for b in biases))


def reference(x, ids, weights, gate, up, down, **options):
    """y, hidden, unweighted out from the PyTorch references."""
    biases, scales = options.get("biases") or (None,) * 3, options.get("scales") or (None,) * 3
    block = options.get("block", (128, 128))
    hidden = K.reference_expert_hidden(x, ids, gate, up, limit=options.get("limit"), alpha=options.get("alpha"),
                                       bias=biases[:2], scale=scales[:2], block=block)
    out = K.reference_expert_out(hidden, ids, None, down, bias=biases[2], scale=scales[2], block=block)
    return K.reference_moe_sum(out, weights), hidden, out


FUSED_CASES = {  # name: (N, k, E, H, I, routing case, options)
    "plain": (9, 2, 4, 40, 24, "random", {}),
    "v4_limit": (7, 2, 4, 40, 24, "random", {"limit": 0.5}),
    "gpt_oss_bias_alpha": (6, 2, 4, 24, 40, "random", {"limit": 0.75, "alpha": 1.702, "bias": True}),
    "empty_expert": (8, 2, 5, 16, 16, "empty_expert", {}),
    "one_expert": (18, 2, 4, 16, 24, "one_expert", {}),
    "tiny_k1": (3, 1, 4, 20, 12, "random", {}),
    "all_on_one_k1": (17, 1, 3, 16, 16, "all_on_one", {}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_experts_matches_reference(name, dtype):
    n, k, experts, hid, inter, case, options = FUSED_CASES[name]
    gate, up, down, biases = expert_weights(experts, inter, hid, dtype, device=DEVICE)
    options = {**options, "biases": biases} if options.pop("bias", False) else dict(options)
    x = torch.randn(n, hid, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    ids = routed_ids(case, n, k, experts).to(DEVICE)
    weights = torch.rand(n, k, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y, hidden, out = K.fused_experts(x, ids, weights, gate, up, down, want_hidden=True, want_out=True,
                                     config=SMALL, **options)
    want_y, want_hidden, want_out = reference(x, ids, weights, gate, up, down, **options)
    close(hidden, want_hidden, dtype)
    close(out, want_out, dtype)
    close(y, want_y, dtype)
    y_weighted, none_h, none_o = K.fused_experts(x, ids, weights, gate, up, down, config=SMALL, **options)
    assert none_h is None and none_o is None
    close(y_weighted, want_y, dtype)


def test_fused_experts_default_config_fused_gate_up_and_bf16_upcast():
    """The table's config, gate and up fused [E, 2I, H], and bf16 (upcast to fp32 for the interpreter's dot)."""
    gate, up, down, _ = expert_weights(4, 24, 40, torch.float32, device=DEVICE)
    x = torch.randn(6, 40, device=DEVICE)
    ids, weights = on_device(routed_ids("random", 6, 2, 4), torch.rand(6, 2))
    want = reference(x, ids, weights, gate, up, down)[0]
    assert K.launch_config(ids.numel(), 4, torch.float32).block_k == K.CONFIGS[0][1].block_k // 2
    close(K.fused_experts(x, ids, weights, torch.cat((gate, up), 1), None, down)[0], want, torch.float32)
    bf = [t.bfloat16() for t in (x, gate, up, down)]
    close(K.fused_experts(bf[0], ids, weights, *bf[1:], config=SMALL)[0],
          reference(*bf[:1], ids, weights, *bf[1:])[0], torch.bfloat16)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and one fp32 multiplier per block of w [E, out, in] (workbench.quant layout, edges padded)."""
    experts, rows, cols = w.shape
    sr, sc = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(experts, sr * block[0], sc * block[1])
    padded[:, :rows, :cols] = w
    tiles = padded.view(experts, sr, block[0], sc, block[1])
    scale = tiles.abs().amax(dim=(2, 4)).clamp(min=1e-12) / 448
    q = (tiles / scale[:, :, None, :, None]).view_as(padded)[:, :rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 weights of w [E, out, in]: uint8 pairs of e2m1 codes [E, out, in / 2] (low nibble first) and uint8
    e8m0 exponents [E, out, in / 32], each the power of two at or above the group's amax / 6."""
    groups = w.unflatten(-1, (-1, 32))
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2**-100) / 6)).clamp(-127, 127)
    x = groups / torch.exp2(exponent)[..., None]
    codes = (x.flatten(-2)[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


@pytest.fixture(params=["native", "decoded"])
def fp8_read(request, monkeypatch):
    """FP8 weights converted by Triton, or decoded from their bytes as on GPUs below sm_89 (capability faked)."""
    if request.param == "decoded":
        monkeypatch.setattr(K.backend, "capability", lambda t: (8, 0))
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,config", [((16, 32), SMALL), ((128, 128), K.LaunchConfig(16, 32, 32, 4, 2))])
def test_fp8_block_scaled_experts(dtype, block, config, fp8_read):
    experts, hid, inter = 4, 72, 40  # neither a multiple of the 16 x 32 blocks nor of the tiles
    gate, up, down, _ = expert_weights(experts, inter, hid, torch.float32)
    (gq, gs), (uq, us), (dq, ds) = (on_device(*quantize_fp8(w, block)) for w in (gate, up, down))
    x = torch.randn(9, hid).to(dtype).to(DEVICE)
    ids, weights = on_device(routed_ids("random", 9, 2, experts), torch.rand(9, 2))
    options = {"scales": (gs, us, ds), "block": block, "limit": 1.0}
    y, hidden, _ = K.fused_experts(x, ids, weights, gq, uq, dq, want_hidden=True, config=config, **options)
    want_y, want_hidden, _ = reference(x, ids, weights, gq, uq, dq, **options)
    close(hidden, want_hidden, dtype)
    close(y, want_y, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
def test_fp4_experts(dtype, fused):
    """FP4 gate, up and down (separate or gate/up fused) against the reference's dequantised weights; H = 96 is
    not a multiple of block_k = 64, I = 64 of block_n = 48 rows a tile in the default config below."""
    experts, hid, inter = 4, 96, 64
    gate, up, down, biases = expert_weights(experts, inter, hid, torch.float32)
    (gq, gs), (uq, us), (dq, ds) = (on_device(*quantize_fp4(w)) for w in (gate, up, down))
    x = torch.randn(9, hid).to(dtype).to(DEVICE)
    ids, weights = on_device(routed_ids("random", 9, 2, experts), torch.rand(9, 2))
    options = {"limit": 1.0, "alpha": 1.702, "biases": tuple(on_device(*(b.to(dtype) for b in biases)))}
    if fused:
        gq, uq, scales = torch.cat((gq, uq), 1), None, (torch.cat((gs, us), 1), None, ds)
    else:
        scales = (gs, us, ds)
    want_y, want_hidden, want_out = reference(x, ids, weights, gq, uq, dq, scales=scales, **options)
    for config in (FP4_SMALL, K.LaunchConfig(16, 32, 64, 4, 2)):
        y, hidden, out = K.fused_experts(x, ids, weights, gq, uq, dq, scales=scales, want_hidden=True, want_out=True,
                                         config=config, **options)
        close(hidden, want_hidden, dtype)
        close(out, want_out, dtype)
        close(y, want_y, dtype)
    # the references' FP4 weights are workbench.quant's dequantisation with e8m0 exponents as multipliers
    w = K.fused_moe._dense(dq.cpu(), 1, ds.cpu(), (128, 128))
    assert torch.equal(w, K.fused_moe.dequant_fp4(dq[1].cpu(), torch.exp2(ds[1].cpu().float() - 127)))


def test_fp4_decoding_is_exact_for_every_byte():
    """Every code pair and exponents from 2^-7 to 2^7 (plus NaN, 0xFF) decode as the reference dequantises:
    an identity hidden through the down kernel returns the weight, exactly (fp32, IEEE dot)."""
    hid, inter = 16, 32  # 16 rows of 16 bytes: all 256 code pairs, one scale group a row
    down = torch.arange(256, dtype=torch.uint8).view(1, hid, inter // 2)
    scale = (120 + torch.arange(hid, dtype=torch.uint8) % 15).view(1, hid, 1)
    scale[0, 5] = 255  # e8m0 NaN: its row (an output column) is NaN for every token
    ids = torch.zeros(inter, 1, dtype=torch.long)
    hidden = torch.eye(inter).view(inter, 1, inter)
    down, scale, ids, hidden = on_device(down, scale, ids, hidden)
    got = K.expert_out(hidden, ids, None, down, scale=scale, config=FP4_SMALL)
    want = K.reference_expert_out(hidden, ids, None, down, scale=scale)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got[:, 0, 5].isnan().all() and not got[:, 0, :5].isnan().any()


def test_fp8_decoding_is_exact_for_every_byte(fp8_read):
    """All 256 e4m3 bytes (subnormals, -0, NaN at 0x7F and 0xFF) through the linear kernel with an identity x.
    Triton's interpreter converts 0x7F to 480, not NaN: there the converted path skips the two NaN bytes."""
    codes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    nan = not (fp8_read == "native" and K.backend.interpreting())
    if not nan:
        codes[:, 15] = 0
    x, weight, scale = on_device(torch.eye(16), codes.view(torch.float8_e4m3fn), torch.ones(1, 1))
    got = K.block_fp8_linear(x, weight, scale, (16, 16))
    torch.testing.assert_close(got, K.reference_block_fp8_linear(x, weight, scale, (16, 16)), rtol=0, atol=0,
                               equal_nan=True)
    assert got[:, 7].isnan().all() == nan and got[:, 15].isnan().all() == nan and not got[:, :7].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((40, 72), (16, 32)), ((200, 136), (128, 128)), ((24, 48), (8, 24))])
def test_block_fp8_linear(dtype, shape, block, fp8_read):
    """x [2, 5, in] @ dequant(W).T with edge blocks (out, in not multiples of the block); a block of 24 inputs
    has no power-of-two factor of 16 or more to tile K with, so the kernel refuses it."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)) / shape[1] ** 0.5
    q, s = (t[0] for t in quantize_fp8(w[None], block))
    x = torch.randn(2, 5, shape[1]).to(dtype)
    x, q, s = on_device(x, q, s)
    if block[1] % 16:
        with pytest.raises(ValueError, match="must divide the FP8 block"):
            K.triton_block_fp8_linear(x, q, s, block)
        return
    y = K.block_fp8_linear(x, q, s, block)
    assert y.shape == (2, 5, shape[0]) and y.dtype == dtype
    close(y, K.reference_block_fp8_linear(x, q, s, block), dtype)


def test_moe_sum_matches_reference():
    out = torch.randn(5, 3, 20, device=DEVICE).half()
    weights = torch.rand(5, 3, device=DEVICE)
    close(K.triton_moe_sum(out, weights), K.reference_moe_sum(out, weights), torch.float16)
    close(K.triton_moe_sum(out), out.float().sum(1), torch.float16)


def test_references_match_the_model_moe():
    """The kernels' references reproduce moe.MoE.routed (weights, hidden and unweighted out) in fp32."""
    experts, hid, inter, n, k = 4, 16, 12, 7, 2
    spec = RouterSpec(experts, k)
    hooks = HookRegistry()
    moe = MoE(hid, spec, inter, hooks, "layers.0", expert_bias=True, limit=0.75, alpha=1.702)
    gate, up, down, biases = expert_weights(experts, inter, hid, torch.float32)
    for p, v in zip((moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj, moe.experts.gate_bias,
                     moe.experts.up_bias, moe.experts.down_bias), (gate, up, down, *biases)):
        p.data = v
    x, ids, weights = torch.randn(n, hid), routed_ids("random", n, k, experts), torch.rand(n, k)
    seen = {}
    with hooks.attached({"layers.0.experts.hidden": lambda t, ctx: seen.setdefault("hidden", t),
                         "layers.0.experts.out": lambda t, ctx: seen.setdefault("out", t)}):
        y = moe.routed(x, ids, weights, (1, n))
    want_y, want_hidden, want_out = reference(x, ids, weights, gate, up, down, limit=0.75, alpha=1.702,
                                              biases=biases)
    close(want_hidden, seen["hidden"].view(n, k, inter), torch.float32)
    close(want_out, seen["out"].view(n, k, hid), torch.float32)
    close(want_y, y, torch.float32)


# ---------------------------------------------------------------- where the kernels can run

def kernel_calls() -> dict:
    """One call of every kernel's `triton_*` launcher on tiny CPU inputs (FP8 experts: the format check too)."""
    gate, up, down, _ = expert_weights(2, 16, 32, torch.float32)
    (gq, gs), (uq, us), (dq, ds) = (quantize_fp8(w, (16, 16)) for w in (gate, up, down))
    ids, x = torch.tensor([[0, 1]]), torch.randn(1, 32)
    return {
        "route_kernel": lambda: K.triton_route(torch.randn(2, 8), RouterSpec(8, 2)),
        "count_kernel / place_kernel": lambda: K.triton_align(ids, 2, 16),
        "gate_up_kernel": lambda: K.triton_expert_hidden(x, ids, gq, uq, scale=(gs, us), block=(16, 16)),
        "down_kernel": lambda: K.triton_expert_out(torch.randn(1, 2, 16), ids, None, dq, scale=ds, block=(16, 16)),
        "sum_kernel": lambda: K.triton_moe_sum(torch.randn(1, 2, 32)),
        "fp8_linear_kernel": lambda: K.triton_block_fp8_linear(x, dq[0], ds[0], (16, 16)),
    }


@pytest.mark.parametrize("kernel", list(kernel_calls()))
def test_kernels_refuse_devices_they_cannot_run_on(kernel, monkeypatch):
    """No triton, a CPU tensor outside the interpreter, or a GPU below sm_80 (capability faked): a KernelError
    naming the kernel, the device and the torch backend, before anything reaches Triton."""
    call = kernel_calls()[kernel]
    with monkeypatch.context() as m:
        m.setattr(K.backend, "capability", lambda t: (7, 5))
        with pytest.raises(KernelError, match=rf"{kernel} cannot run on cpu: compute capability 7\.5, the kernels "
                                              r'need 8\.0 or newer; load the model with backend="torch"'):
            call()
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")
        m.setattr(K.backend, "capability", lambda t: None)
        with pytest.raises(KernelError, match=rf'{kernel} runs on CUDA tensors, got one on cpu .*backend="torch"'):
            call()
    with monkeypatch.context() as m:
        m.setattr(K.backend, "has_triton", lambda: False)
        with pytest.raises(KernelError, match=rf'{kernel}: triton is not installed .*backend="torch"'):
            call()
        assert not K.backend.use_triton(torch.zeros(1))  # the dispatchers run the references instead
    assert isinstance(KernelError("x"), RuntimeError)


@pytest.mark.parametrize("capability,fp8", [((8, 0), "fp8_bits"), ((8, 6), "fp8_bits"), ((8, 9), "fp8"),
                                            ((9, 0), "fp8"), ((10, 0), "fp8"), (None, "fp8")])
def test_weight_format_follows_the_capability(capability, fp8):
    """Triton converts e4m3 itself from sm_89 (and in the interpreter); below, the kernels decode the bytes."""
    assert K.backend.weight_format(torch.zeros(1, dtype=torch.float8_e4m3fn), capability) == fp8
    assert K.backend.weight_format(torch.zeros(1, dtype=torch.uint8), capability) == "fp4"
    assert K.backend.weight_format(torch.zeros(1, dtype=torch.bfloat16), capability) == "plain"
    with pytest.raises(TypeError, match="int32"):
        K.backend.weight_format(torch.zeros(1, dtype=torch.int32), capability)


def test_quantised_weights_are_checked():
    gate, up, down, _ = expert_weights(2, 16, 64, torch.float32)
    (gq, gs), (uq, us) = quantize_fp4(gate), quantize_fp4(up)
    x, ids = torch.randn(1, 64, device=DEVICE), torch.tensor([[0, 1]], device=DEVICE)
    gq, gs, uq, us = on_device(gq, gs, uq, us)
    with pytest.raises(ValueError, match="multiple of the FP4 scale group 32"):
        K.triton_expert_hidden(x, ids, gq, uq, scale=(gs, us), config=SMALL)
    with pytest.raises(ValueError, match=r"need scales of shape \[2, 16, 2\], got \[2, 16, 1\]"):
        K.triton_expert_hidden(x, ids, gq, uq, scale=(gs[..., :1], us[..., :1]), config=FP4_SMALL)
    with pytest.raises(ValueError, match=r"FP4 weights \[2, 16, 32\] hold 64 inputs a row, not 32"):
        K.triton_expert_hidden(x[:, :32], ids, gq, uq, scale=(gs, us), config=FP4_SMALL)
    with pytest.raises(ValueError, match="e8m0 exponent bytes"):
        K.triton_expert_hidden(x, ids, gq, uq, scale=(gs.float(), us.float()), config=FP4_SMALL)
    with pytest.raises(ValueError, match="need their scales"):
        K.triton_expert_hidden(x, ids, gq, uq, config=FP4_SMALL)
    with pytest.raises(ValueError, match="scales come with FP8"):
        K.triton_expert_hidden(x, ids, *on_device(gate, up), scale=(gs, us), config=FP4_SMALL)


# ---------------------------------------------------------------- packaging and the GPU benchmark

def test_imports_and_runs_references_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, workbench.kernels as K\n"
            "from workbench.routing import RouterSpec\n"
            "assert not K.backend.has_triton()\n"
            "ids, w = K.route(torch.randn(3, 8), RouterSpec(8, 2, renormalize=True))\n"
            "y, _, _ = K.fused_experts(torch.randn(3, 4), ids, w, torch.randn(8, 6, 4), torch.randn(8, 6, 4),\n"
            "                          torch.randn(8, 4, 6))\n"
            "assert y.shape == (3, 4) and 'triton' not in [m for m in sys.modules if sys.modules[m]]\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd="/")


def test_gpu_benchmark_parses_arguments_and_refuses_without_gpu():
    bench = load_script("gpu_moe")
    args = bench.parse_args(["--tokens", "1,64", "--dtype", "fp8", "--experts", "8"])
    assert args.tokens == [1, 64] and args.dtype == ["fp8"] and args.experts == 8
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            bench.main(["--tokens", "1"])
    # its torch baseline (grouped GEMM and per-expert loop) and FP8 quantiser agree with the references
    gate, up, down, _ = expert_weights(4, 24, 16, torch.bfloat16)
    x, ids, weights = torch.randn(6, 16).bfloat16(), routed_ids("empty_expert", 6, 2, 4), torch.rand(6, 2)
    want = reference(x, ids, weights, gate, up, down)[0]
    for mm in (bench.grouped_mm()[1], None):
        close(bench.torch_moe(x, ids, weights, torch.cat((gate, up), 1), down, mm), want, torch.bfloat16)
    q, s = bench.quantize_fp8(gate.float())
    want_q, want_s = quantize_fp8(gate.float(), bench.FP8_BLOCK)
    assert torch.equal(q.float(), want_q.float()) and torch.equal(s, want_s)
    # its FP4 quantiser and dequantised copies match these tests', and its check compares like with like
    w = torch.randn(3, 8, 64)
    q4, s4 = bench.quantize_fp4(w)
    want_q4, want_s4 = quantize_fp4(w)
    assert torch.equal(s4, want_s4)
    deq = bench.dequantized("fp4", (q4, s4), torch.empty(3, 8, 64))
    assert torch.equal(deq, bench.dequantized("fp4", (want_q4, want_s4), torch.empty(3, 8, 64)))
    gate_up, down = torch.randn(4, 64, 32) / 6, torch.randn(4, 32, 32) / 6  # I = 32, H = 32
    quantized = {"fp4": (bench.quantize_fp4(gate_up), bench.quantize_fp4(down))}
    x, ids, weights = torch.randn(6, 32).bfloat16(), routed_ids("random", 6, 2, 4), torch.rand(6, 2)
    (gq, gs), (dq, ds) = quantized["fp4"]
    y = K.reference_moe_sum(K.reference_expert_out(K.reference_expert_hidden(
        x, ids, gq, None, scale=(gs, None)), ids, None, dq, scale=ds), weights)
    assert bench.check(y, x, ids, weights, "fp4", gate_up.bfloat16(), down.bfloat16(), quantized, None) < 2e-2


def load_script(name: str):
    """A bench/ script as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_parses_arguments_refuses_without_gpu_and_judges_results(tmp_path):
    check = load_script("gpu_check")
    args = check.parse_args(["--out", str(tmp_path / "r.json"), "--workers", "2", "--tokens", "1,64"])
    assert args.out == tmp_path / "r.json" and args.workers == 2 and args.tokens == "1,64" and args.repeat == 10
    with pytest.raises(SystemExit):
        check.parse_args(["--workers", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU .*none is visible"):
            check.main(["--out", str(tmp_path / "r.json")])
        assert not (tmp_path / "r.json").exists()
    # the verdict: failed tests, cuda tests that did not pass, outputs off their baseline
    row = dict(tokens=1, dtype="fp4", triton_ms=0.1, torch_ms=0.2, speedup=2.0, gbs=1000.0, copy_fraction=0.3,
               tflops=1.0, rel_diff=1e-3)
    results = {
        "environment": {"device": "H100", "capability": "90", "torch": "2", "triton": "3"},
        "tests": {"seconds": 1.0, "cuda_marked": ["t::a", "t::b"],
                  "tests": {"t::a": {"outcome": "passed", "seconds": 1.0, "message": ""},
                            "t::b": {"outcome": "passed", "seconds": 1.0, "message": ""}}},
        "benchmark": {"seconds": 1.0, "shape": dict(H=1, I=1, E=1, k=1), "baseline": "grouped_mm", "copy_gbs": 3000.0,
                      "matmul_tflops": 700.0, "rows": [row]},
    }
    assert check.failures(results) == [] and "**PASS**" in check.summary(results)
    assert "| 1 | fp4 | 0.100 | 0.200 | 2.00x | 1000 | 30% | 1.0 | 1.0e-03 |" in check.summary(results)
    results["tests"]["tests"]["t::b"] = {"outcome": "skipped", "seconds": 0.0, "message": "needs a CUDA GPU"}
    row["rel_diff"] = 0.5
    assert check.failures(results) == ["t::b: skipped (a cuda test must pass on a GPU)",
                                       "benchmark T=1 fp4: y differs from the baseline by 0.5 (> 0.02)"]
    assert "**FAIL** (2)" in check.summary(results)


# ---------------------------------------------------------------- on a GPU: each family's model, and quantised ones

FAMILIES = {  # name: (config, vocab, writer) of the tiny checkpoints each family's tests build
    "mixtral": (lambda: tf.MixtralConfig(**DENSE, num_local_experts=6, num_experts_per_tok=2), 96, make_checkpoint),
    "qwen2-moe": (lambda: qwen2(norm_topk_prob=True), 96, make_checkpoint),
    "qwen3-moe": (qwen3, 96, make_checkpoint),
    "olmoe": (olmoe, 96, make_checkpoint),
    "gpt-oss": (lambda: gpt_oss(swiglu_limit=0.5), 96, make_checkpoint),
    "deepseek-v2": (lambda: v2(topk_method="group_limited_greedy", n_group=4, topk_group=2), 96, make_checkpoint),
    "deepseek-v3": (lambda: v3(n_group=4, topk_group=2, num_experts_per_tok=3), 96, make_checkpoint),
    "deepseek-v3.2": (v32, 96, make_checkpoint),
    "deepseek-v4": (lambda: V4_CONFIGS["hc2-every-kind-rates-not-dividing-yarn"][0](), V4_VOCAB, make_v4),
}


def assert_bf16_runs_agree(a: tuple[Path, str], b: tuple[Path, str], vocab: int, what: str) -> None:
    """The (folder, backend) pairs a and b, loaded in bf16 on the GPU, route at least 90% of the tokens to the same
    experts in every layer, and their logits on those tokens differ by at most 5% (relative L2). bf16 rounding
    alone moves these tiny perturbed models' logits 3-11% from fp32 (and the torch and triton backends about
    2% apart: measured on CPU, the kernels under the interpreter)."""
    ids = input_ids(vocab).to(DEVICE)
    runs = []
    for folder, backend in (a, b):
        model = wb.load(folder, dtype=torch.bfloat16, device=DEVICE, backend=backend)
        assert model.backend == backend
        runs.append(model.run_with_cache(ids, names=["*.router.topk_ids"]))
    (want, want_ids), (got, got_ids) = runs
    same = torch.ones(ids.shape, dtype=torch.bool, device=DEVICE)
    for name, chosen in want_ids.items():
        same &= (chosen.sort(-1).values == got_ids[name].sort(-1).values).all(-1)
    assert same.float().mean() >= 0.9, f"{what}: routing differs on {(~same).sum()} of {same.numel()} tokens"
    diff = ((got[same].float() - want[same].float()).norm() / want[same].float().norm()).item()
    assert diff <= 0.05, f"{what}: logits differ by {diff:.3g} (relative L2) on the tokens routed alike"


@cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_on_triton_matches_torch_in_bf16(family, tmp_path):
    config, vocab, write = FAMILIES[family]
    write(config(), tmp_path)
    assert_bf16_runs_agree((tmp_path, "torch"), (tmp_path, "triton"), vocab, family)


@cuda
def test_fp8_checkpoint_on_triton_matches_its_dequantised_copy(fp8_pair):
    fp8, dequantised, _ = fp8_pair
    assert_bf16_runs_agree((dequantised, "triton"), (fp8, "triton"), 96, "FP8")


@cuda
def test_v4_fp8_fp4_checkpoint_on_triton_matches_its_dequantised_copy(v4_quantised):
    quantised, dequantised, _ = v4_quantised
    assert_bf16_runs_agree((dequantised, "triton"), (quantised, "triton"), V4_VOCAB, "V4 FP8/FP4")
