"""The few-row streaming kernels (workbench.models.stream) against torch: grouped linears over fp32, FP8 and FP4
weights, the row-wise GLU, and the paths that use them (`Linear`, the grouped backend's streamed experts)."""

import types

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from workbench import quant
from workbench.models import stream
from workbench.models.layers import Linear, project
from workbench.models.moe import Experts
from workbench.routing import RouterSpec, select_experts

E, OUT, IN = 5, 70, 96  # 70 output rows: two full chunks, then 4-row groups and a 2-row tail


@pytest.fixture(autouse=True)
def seeded():
    """Each test draws the same random inputs."""
    torch.manual_seed(0)


def count_kernel_calls(monkeypatch, record) -> list:
    """Calls of the weight-streaming kernel from now on, each as record(its args); the other kernels run as is."""
    jit, calls = stream._jit(), []
    counted = types.SimpleNamespace(**{k: getattr(jit, k) for k in dir(jit) if not k.startswith("_")})
    counted.kernel = lambda *a: (calls.append(record(a)), jit.kernel(*a))
    monkeypatch.setattr(stream, "_jit", lambda: counted)
    return calls


def pairs(counts: list[int], n_rows: int = 40) -> tuple[torch.Tensor, ...]:
    """(rows, experts, begin, end) of pairs sorted by expert, counts[j] pairs for expert j (zero: not listed)."""
    g = torch.Generator().manual_seed(1)
    listed = [e for e, c in enumerate(counts) if c]
    ends = torch.tensor(counts).cumsum(0)
    begin, end = (ends - torch.tensor(counts))[listed], ends[listed]
    return torch.randint(0, n_rows, (sum(counts),), generator=g), torch.tensor(listed), begin, end


def fp8_weights() -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """FP8 codes [E, OUT, IN] with fp32 scales per (32, 64) block (ragged at both edges)."""
    codes = (torch.randn(E, OUT, IN) * 40).clamp(-440, 440).to(quant.FP8)
    return codes, torch.rand(E, 3, 2) + 0.25, (32, 64)


def fp4_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """Packed FP4 codes [E, OUT, IN / 2] and e8m0 exponents per 32 values."""
    return (torch.randint(0, 256, (E, OUT, IN // 2), dtype=torch.uint8),
            torch.randint(120, 132, (E, OUT, IN // 32), dtype=torch.uint8))


@pytest.mark.parametrize("counts", [[1, 0, 3, 2, 5], [7, 4, 0, 0, 9], [0, 0, 1, 0, 0]])
def test_grouped_linear_equals_matmuls(counts):
    x = torch.randn(40, IN)
    rows, experts, begin, end = pairs(counts)
    weights = (torch.randn(E, OUT, IN), torch.randn(E, OUT, IN))
    got = stream.grouped_linear(x, rows, experts, begin, end, weights)
    want = stream.reference_grouped_linear(x, rows, experts, begin, end, weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="one output size"):
        stream.grouped_linear(x, rows, experts, begin, end, (weights[0], weights[1][:, :8]))


def test_quantised_codes_decode_as_dequantize_bit_for_bit():
    """Kept codes give exactly what their dequantised floats give (the contract of kept checkpoints)."""
    x = torch.randn(40, IN)
    rows, experts, begin, end = pairs([2, 1, 0, 6, 11])  # both loop orders: 2-8 rows, and 1 or more than 8
    codes, scale, block = fp8_weights()
    packed, exponents = fp4_weights()
    for held, scales, blk, floats in ((codes, scale, block, quant.dequant_fp8(codes, scale, block)),
                                      (packed, exponents, None, quant.dequant_fp4(packed, exponents))):
        kept, = stream.grouped_linear(x, rows, experts, begin, end, (held,), (scales,), blk)
        deq, = stream.grouped_linear(x, rows, experts, begin, end, (floats.contiguous(),))
        assert torch.equal(kept, deq)
        want, = stream.reference_grouped_linear(x, rows, experts, begin, end, (held,), (scales,), blk)
        torch.testing.assert_close(kept, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_an_experts_results_do_not_depend_on_the_others_in_the_call():
    """An expert's outputs are the same bits alone or beside other experts and rows (expert parallelism sends each
    rank only its own experts), and a single row's the same whatever rows precede it."""
    x, weights = torch.randn(40, IN), (torch.randn(E, OUT, IN),)
    rows, experts, begin, end = pairs([3, 5, 2, 1, 4])
    together, = stream.grouped_linear(x, rows, experts, begin, end, weights)
    for j in range(E):
        block = slice(int(begin[j]), int(end[j]))
        alone, = stream.grouped_linear(x, rows[block], experts[j:j + 1], torch.tensor([0]),
                                       torch.tensor([block.stop - block.start]), weights)
        assert torch.equal(alone, together[block])


def test_unlisted_rows_are_left_unwritten():
    x, weights = torch.randn(40, IN), (torch.randn(E, OUT, IN),)
    rows, experts, begin, end = pairs([2, 3, 0, 0, 0])
    out, = stream.grouped_linear(x, rows, experts[1:], begin[1:], end[1:], weights)  # expert 0's pairs left out
    want, = stream.reference_grouped_linear(x, rows, experts[1:], begin[1:], end[1:], weights)
    torch.testing.assert_close(out[2:], want[2:], rtol=1e-5, atol=1e-4)
    assert not want[:2].any()


@pytest.mark.parametrize("act,limit,alpha", [(F.silu, None, None), (F.gelu, None, None), (F.silu, 7.0, 1.702)])
def test_glu_equals_the_experts_activation_row_by_row(act, limit, alpha):
    gate, up = torch.randn(37, 45) * 4, torch.randn(37, 45) * 4
    experts = Experts(1, 8, 45, act, limit=limit, alpha=alpha)
    got, want = stream.glu(gate, up, act, limit, alpha), experts.glu(gate, up)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert torch.equal(stream.glu(gate[5:9].clone(), up[5:9].clone(), act, limit, alpha), got[5:9])


def test_linear_streams_a_few_rows_and_matmuls_the_rest(monkeypatch):
    layer = Linear(IN, OUT)
    calls = count_kernel_calls(monkeypatch, lambda args: args[0].shape[0])  # rows of x
    with torch.no_grad():
        for rows in (1, stream.ROWS, stream.ROWS + 1):
            x = torch.randn(1, rows, IN)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert calls == [1, stream.ROWS]
    x = torch.randn(2, IN, requires_grad=True)  # autograd records: torch's op, which has a backward
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, -1))
    assert calls == [1, stream.ROWS]


@pytest.mark.parametrize("rows", [6, 7, 8])
def test_linear_pads_output_rows_4kb_apart_without_changing_a_bit(monkeypatch, rows):
    """Outputs 4 KB apart, written in the `across` order, go through a padded buffer (`stream._aliasing`): the
    layer returns the same contiguous values as unpadded."""
    weight, bias = torch.randn(1024, 512), torch.randn(1024)
    x = torch.randn(1, rows, 512)
    padded = stream._aliasing(rows, 512, 1024)
    assert padded == (rows >= 7) and not stream._aliasing(rows, 512, 1032) and not stream._aliasing(rows, 256, 1024)
    got = stream.linear(x, weight, bias)
    monkeypatch.setattr(stream, "_aliasing", lambda *args: False)
    want = stream.linear(x, weight, bias)
    assert got.is_contiguous() and got.shape == (1, rows, 1024) and torch.equal(got, want)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_project_runs_projections_of_one_input_in_one_pass_with_their_own_bits(monkeypatch):
    """q, k and v (biased, different widths, one 4 KB-strided and padded) in one kernel call, each output equal to
    its own layer's; a torch hook on one of them, or more rows than stream, and each layer is called as usual."""
    layers = Linear(512, 1024), Linear(512, 40), Linear(512, 8, bias=False)
    x = torch.randn(1, 8, 512)
    calls = count_kernel_calls(monkeypatch, lambda args: [o.shape[1] for o in args[-1]])
    with torch.no_grad():
        want = [m(x) for m in layers]
        assert calls == [[1024 + stream.ALIAS_PAD], [40], [8]]
        got = project(x, *layers)
        assert calls[3:] == [[1024 + stream.ALIAS_PAD, 40, 8]]
        assert all(g.shape == w.shape and g.is_contiguous() and torch.equal(g, w) for g, w in zip(got, want))
        seen = []
        handle = layers[1].register_forward_hook(lambda m, args, out: seen.append(1) or out * 2)
        hooked = project(x, *layers)
        handle.remove()
        assert seen == [1] and len(calls) == 7 and torch.equal(hooked[1], want[1] * 2)
        wide = torch.randn(1, stream.ROWS + 1, 512)
        assert all(torch.equal(g, m(wide)) for g, m in zip(project(wide, *layers), layers)) and len(calls) == 7


def test_few_rows_keep_the_graph_of_trainable_weights(mixtral_ckpt):
    """Weights a user makes trainable get their gradients from a few-row forward, as from the reference loop: the
    kernels, which have no backward, step aside when autograd records a weight, not only the activations."""
    grads = {}
    for backend in ("grouped", "torch"):
        model = wb.load(mixtral_ckpt[0], dtype=torch.float32, backend=backend)
        model.lm_head.requires_grad_(True)
        model.layers["0"].ffn.experts.requires_grad_(True)
        logits = model(torch.tensor([[3, 14, 15, 92]]))
        assert logits.requires_grad
        logits.logsumexp(-1).sum().backward()
        grads[backend] = (model.lm_head.weight.grad, model.layers["0"].ffn.experts.down_proj.grad)
    for got, want in zip(grads["grouped"], grads["torch"]):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape", [(1, 8, 3, 8), (2, 4, 5, 12), (3, 7, 16), (1, 1, 1, 64)])
def test_rope_at_a_few_tokens_equals_torchs_ops_bit_for_bit(monkeypatch, interleaved, shape):
    """`Rotary.apply` of a few fp32 tokens runs `stream.rope`: the same bits as its torch ops, for strided inputs
    (as attention's split views), channels past the rotated ones, and any leading axes."""
    from workbench.models.layers import Rotary

    rot = Rotary(8, {"rope_type": "default", "rope_theta": 10000.0}, interleaved=interleaved)
    cos, sin = rot.cos_sin(torch.arange(40, 40 + shape[-2]), torch.float32)
    x = (torch.randn(*shape[:-1], shape[-1] + 3) * 3)[..., 2: 2 + shape[-1]]  # not contiguous
    calls = []
    kernel = stream.rope
    monkeypatch.setattr(stream, "rope", lambda *args: calls.append(1) or kernel(*args))
    got = rot.apply(x, cos, sin)
    monkeypatch.setattr(stream, "ROWS", 0)  # torch's ops
    want = rot.apply(x, cos, sin)
    assert calls == [1] and got.shape == x.shape and torch.equal(got, want)
    assert not torch.equal(got[..., :8], x[..., :8]) and torch.equal(got[..., 8:], x[..., 8:])


def test_plan_sorts_pairs_as_torch_and_sends_each_expert_by_its_own_count():
    """The counting sort gives torch's stable sort, its inverse and the per-place rows and experts; experts of at
    most ROWS pairs stream and the others run as matmuls, whatever their neighbours."""
    r = stream.ROWS
    counts = [0, r, r + 1, 1, 0, 40]
    flat = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    flat = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))]
    wide = torch.cat((flat.view(-1, 2), torch.zeros(len(flat) // 2, 3, dtype=torch.long)), 1)
    for ids in (flat.view(-1, 2), wide[:, :2]):  # contiguous, and strided as the router's top-k columns are
        p = stream.plan(ids, len(counts))
        order = torch.sort(flat, stable=True).indices
        assert p.order.tolist() == order.tolist() and p.where.tolist() == torch.argsort(order).tolist()
        assert p.rows.tolist() == (order // 2).tolist() and p.experts.tolist() == flat[order].tolist()
        assert p.few.tolist() == [1, 3] and p.begin.tolist() == [0, 2 * r + 1] and p.end.tolist() == [r, 2 * r + 2]
        assert p.blocks == [(2, slice(r, 2 * r + 1)), (5, slice(2 * r + 2, 2 * r + 42))]
    with pytest.raises(ValueError, match=r"expert id 6 is outside \[0, 6\) \(1 such ids\)"):
        stream.plan(torch.tensor([[0, 6]]), 6)


@pytest.mark.parametrize("spec", [
    RouterSpec(48, 4, score="sigmoid", correction_bias=True, groups=4, topk_groups=2),  # V3: top-2 sums, bias
    RouterSpec(64, 6, groups=8, topk_groups=3, group_score="max"),  # V2's group-limited greedy
    RouterSpec(8, 2), RouterSpec(16, 4, groups=4, topk_groups=4)])
def test_select_picks_the_ids_of_the_torch_rule(spec):
    """The compiled selection gives `routing.select_experts`'s ids, ties (scores on a coarse grid) and -inf included;
    a NaN score leaves the choice to torch."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        scores = torch.rand(1 + trial % 32, spec.experts, generator=g)
        if trial % 2:
            scores = (scores * 4).round() / 4
        scores[0, : trial % 6] = float("-inf")
        bias = (torch.randn(spec.experts, generator=g) * 2).round() / 4 if spec.correction_bias else None
        assert torch.equal(stream.select(scores, spec, bias), select_experts(scores, spec, bias)), trial
    scores[-1, 3] = float("nan")
    assert stream.select(scores, spec, bias) is None


def test_streamed_experts_match_the_reference_loop(mixtral_ckpt, monkeypatch):
    """A few tokens through the grouped backend stream every expert (and dense linear); the logits match the
    torch loop's, recording experts.hidden and experts.out changes nothing, and an edit of the hidden states
    reaches the outputs as on the loop."""
    folder, _ = mixtral_ckpt
    grouped = wb.load(folder, dtype=torch.float32, backend="grouped")
    loop = wb.load(folder, dtype=torch.float32, backend="torch")
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    calls = count_kernel_calls(monkeypatch, lambda args: len(args[-1]))  # projections in one pass
    plain = grouped(ids)
    assert calls.count(2) == 3  # gate + up of every MoE layer in one pass each
    torch.testing.assert_close(plain, loop(ids), rtol=1e-5, atol=1e-5)
    hooked, cache = grouped.run_with_cache(ids, names=["layers.*.experts.hidden", "layers.*.experts.out"])
    assert torch.equal(hooked, plain) and len(cache) == 6
    edit = {"layers.1.experts.hidden": lambda h, ctx: h * 0.5}
    with grouped.hooks(edit), loop.hooks(edit):
        edited, want = grouped(ids), loop(ids)
    torch.testing.assert_close(edited, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited, plain)


@pytest.mark.parametrize("shape", [(1, 4, 512), (37, 3, 45), (128, 8, 7)])
def test_moe_sum_equals_the_reference_bit_for_bit(shape):
    """Every backend combines through `MoE.combine`: on CPU fp32 this one pass, elsewhere the reference."""
    from workbench.kernels import reference_moe_sum

    outs, weights = torch.randn(*shape) * 3, torch.rand(*shape[:2])
    want = reference_moe_sum(outs, weights)
    assert torch.equal(stream.moe_sum(outs, weights), want)
    order = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(1))  # outs in sorted order
    assert torch.equal(stream.moe_sum(outs.flatten(0, 1)[order], weights, torch.argsort(order).numpy()), want)


def test_rms_norm_fp32_path_equals_the_composite():
    from workbench.models.layers import RMSNorm

    norm = RMSNorm(192, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(192))
    x = torch.randn(3, 17, 192) * 4
    composite = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(norm(x), composite)


def test_wide_vectors_makes_a_parallel_loop_vectorise_with_the_widest_registers():
    """A prange body that calls `wide_vectors` carries the attribute and, on a CPU with AVX-512, its dot runs on
    512-bit registers; the same body without the call is left to LLVM's tuning (256-bit on this project's Xeon)."""
    import re

    import numba
    import numpy as np
    from llvmlite import binding

    from workbench.models import stream_jit

    def dots(w, x, out):
        for i in numba.prange(w.shape[0]):
            stream_jit.wide_vectors()
            out[i] = stream_jit.dot(w[i], x)

    wide = numba.njit(parallel=True, fastmath=True)(dots)
    w, x, out = np.ones((8, 512), np.float32), np.full(512, 0.5, np.float32), np.zeros(8, np.float32)
    wide(w, x, out)
    assert (out == 256).all()
    library = wide.overloads[wide.signatures[0]].library
    assert stream_jit.WIDE in library.get_llvm_str()
    if "+avx512f" not in binding.get_host_cpu_features().flatten().split(","):
        pytest.skip("no AVX-512 on this CPU: the widest vectors are the ones LLVM picks anyway")
    assert re.search(r"vfmadd\w*ps\s.*%zmm", library.get_asm_str())


def test_compiles_of_workbench_kernels_show_a_progress_line(monkeypatch, capfd):
    """A workbench kernel compiling for longer than SILENT_COMPILE_S shows a line naming it; a shorter compile, or
    another package's, shows nothing."""
    import numba
    import numpy as np

    from workbench import parallel

    def kernel(a):  # a stand-in, compiled fresh each time (no cache): a cache miss
        return a.sum()

    def compile_as(module: str) -> None:
        kernel.__module__ = module
        numba.njit(cache=False)(kernel)(np.ones(3))

    parallel.announce_compiles()
    monkeypatch.setattr(parallel, "SILENT_COMPILE_S", 0.0)
    compile_as("workbench.models.example")
    assert "compiling workbench.models.example.test_compiles_of_workbench_kernels_show_a_progress_line.<locals>." \
           "kernel (first use; cached on disk after): 00:0" in capfd.readouterr().err
    compile_as("someone_else")
    monkeypatch.setattr(parallel, "SILENT_COMPILE_S", 60.0)
    compile_as("workbench.models.example")
    assert "compiling" not in capfd.readouterr().err
