"""Triton kernels against their PyTorch references, on CPU through Triton's interpreter (tiny shapes: it is slow).

The interpreter computes bf16 tl.dot on raw bit patterns, so kernels are checked in fp32 and fp16; the one
bf16 check covers the kernels' fp32 upcast under the interpreter.
"""

import os

PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit module is imported

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the kernel tests run on its CPU interpreter")

import workbench.kernels as K  # noqa: E402
from workbench.hooks import HookRegistry  # noqa: E402
from workbench.models.moe import MoE, Router  # noqa: E402
from workbench.routing import RouterSpec, router_scores  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
SMALL = K.LaunchConfig(16, 16, 16, 4, 2)  # several K and N tiles on tiny H / I


@pytest.fixture(autouse=True, scope="module")
def _interpreter_only_here():
    """Give the test modules that run after this one the TRITON_INTERPRET they would have had."""
    yield
    if PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = PREVIOUS_INTERPRET


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
    ids, weights = K.triton_route(logits, spec, bias, ids_dtype=ids_dtype)
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
    ids, _ = K.triton_route(logits, spec, bias)
    assert torch.equal(ids, torch.tensor([[4, 5, 6, 7]] * 2))
    assert torch.equal(ids, model_route(logits, spec, bias)[0])


def test_route_dispatch_uses_the_kernel_under_the_interpreter():
    spec = ROUTERS["softmax_renorm_eps"]
    logits = torch.randn(5, 8)
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
    ids = routed_ids(case, n, k, experts)
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

def expert_weights(experts: int, inter: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    """gate, up [E, I, H], down [E, H, I] and biases, scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(experts, inter, hidden, generator=g) / hidden**0.5
    up = torch.randn(experts, inter, hidden, generator=g) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    biases = (torch.randn(experts, inter, generator=g), torch.randn(experts, inter, generator=g),
              torch.randn(experts, hidden, generator=g))
    return (*(t.to(dtype) for t in (gate, up, down)), tuple(b.to(dtype) for b in biases))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_experts_matches_reference(name, dtype):
    n, k, experts, hid, inter, case, options = FUSED_CASES[name]
    gate, up, down, biases = expert_weights(experts, inter, hid, dtype)
    options = {**options, "biases": biases} if options.pop("bias", False) else dict(options)
    x = torch.randn(n, hid, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids = routed_ids(case, n, k, experts)
    weights = torch.rand(n, k, generator=torch.Generator().manual_seed(2))
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
    gate, up, down, _ = expert_weights(4, 24, 40, torch.float32)
    x = torch.randn(6, 40)
    ids, weights = routed_ids("random", 6, 2, 4), torch.rand(6, 2)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block,config", [((16, 32), SMALL), ((128, 128), K.LaunchConfig(16, 32, 32, 4, 2))])
def test_fp8_block_scaled_experts(dtype, block, config):
    experts, hid, inter = 4, 72, 40  # neither a multiple of the 16 x 32 blocks nor of the tiles
    gate, up, down, _ = expert_weights(experts, inter, hid, torch.float32)
    (gq, gs), (uq, us), (dq, ds) = (quantize_fp8(w, block) for w in (gate, up, down))
    x = torch.randn(9, hid).to(dtype)
    ids, weights = routed_ids("random", 9, 2, experts), torch.rand(9, 2)
    options = {"scales": (gs, us, ds), "block": block, "limit": 1.0}
    y, hidden, _ = K.fused_experts(x, ids, weights, gq, uq, dq, want_hidden=True, config=config, **options)
    want_y, want_hidden, _ = reference(x, ids, weights, gq, uq, dq, **options)
    close(hidden, want_hidden, dtype)
    close(y, want_y, dtype)


def test_moe_sum_matches_reference():
    out = torch.randn(5, 3, 20).half()
    weights = torch.rand(5, 3)
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
    spec = importlib.util.spec_from_file_location("gpu_moe", ROOT / "bench" / "gpu_moe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
