"""CPU kernels for a few rows per weight: each weight row is read from memory once and dotted with every input
row that needs it.

At 1-32 tokens (prompts, decode steps) a forward is a stream of weights. A BLAS matmul of a few rows spends much
of each call starting up (packing, threading) and reads small weights well below memory speed, and the grouped
backend makes one such call per expert and projection. `grouped_linear` instead streams all the chosen experts of
a projection in one parallel pass, and `linear` a dense layer's weight.

An output depends only on its weight row, its input row, the input row's place among its expert's rows (taken
four at a time) and how many rows and inputs the expert has (which pick the loop order, `stream_jit.ACROSS_*`):
never on the other experts in the call, nor on how the work is split over threads, so an expert's results are
the same whichever path its neighbours take (expert parallelism relies on it). `rope` rotates a few tokens'
queries and keys in one call, with the bits of `layers.Rotary`'s torch ops.
Quantised weights (FP8 e4m3 with fp32 block scales, FP4 e2m1 with e8m0 exponents, `workbench.quant`'s layouts)
are decoded row by row into a scratch row as the same fp32 products `quant.dequantize_into` writes, and the same
code dots them, so a kept checkpoint gives the dequantised one's results bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import quant
from ..routing import RouterSpec
from ..parallel import torch_threads

# a weight (an expert's, or a dense layer's) with at most this many input rows streams; above, a BLAS matmul's
# blocking reuses each weight value better (measured, bench/small_batch.py: at 32 rows this kernel is still ahead)
ROWS = 32


_HELD = (torch.float32, quant.FP8, torch.uint8)  # weights as floats, FP8 codes, packed FP4 codes


def streams(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes inputs like x against weights like `weight`: fp32 rows on the CPU, weights held
    as fp32 or as quantised codes. (It has no backward: callers check that autograd is not recording.)"""
    return x.is_cpu and x.dtype == torch.float32 and weight.is_cpu and weight.dtype in _HELD


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
           block: tuple[int, int] | None = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in].T + bias through the kernel, fp32 (FP8 codes with their `scale` and `block`)."""
    out, = linears(x, (weight,), None if scale is None else (scale,), block)
    return out if bias is None else out + bias


def linears(x: torch.Tensor, weights: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor, ...] | None = None,
            block: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """x [..., in] @ W.T for each W [out_i, in] of `weights` (projections of one input, such as a layer's gate and
    up) in one kernel pass, fp32: each output as `linear` gives it alone, one call's fixed cost for all. FP8
    codes with their `scales` and `block`."""
    inputs = x.shape[-1]
    n = x.numel() // inputs
    widths = [w.shape[0] for w in weights]
    outs = tuple([np.empty((n, c + ALIAS_PAD if _aliasing(n, inputs, c) else c), np.float32) for c in widths])
    if n:
        index = indices(n + 1)
        rows = _array(x if x.is_contiguous() else x.contiguous()).reshape(n, inputs)
        held = _dense(weights) if scales is None else _held(weights, scales, block)
        _call(rows, index[:n], _ZERO, _ZERO, index[n:], *held, outs)
    shape = x.shape[:-1]
    return tuple([torch.from_numpy((o if o.shape[1] == c else o[:, :c].copy()).reshape(shape + (c,)))
                  for o, c in zip(outs, widths)])


ALIAS_PAD = 16  # floats (64 bytes) added to output rows that would be a multiple of 4 KB apart (`_aliasing`)


def _aliasing(rows: int, inputs: int, width: int) -> bool:
    """Whether a dense linear's output rows, written in the kernel's `across` order, would evict each other: all
    `rows` outputs of a weight row go to one L1 set when rows are a multiple of 4 KB apart, and with the inputs
    filling most of L1 the set overflows. The kernel then writes rows 64 bytes further apart, copied back after
    (an 8192 x 512 weight at 8 rows: read at 26 GB/s, and at 45 GB/s padded, on a 2-core AMD EPYC; at 256
    inputs, or 5 rows or fewer, padding gained nothing). The values are the same either way."""
    if (width * 4) % 4096 or rows < 7:
        return False
    jit = _jit()
    return rows * inputs * 4 > 3 * jit.ACROSS_VALUES and jit.across_order(rows, inputs)


class Plan(NamedTuple):
    """The (token, slot) pairs of expert ids [N, k] sorted by expert, stably (pair i is token i // k's slot i % k,
    so each expert's pairs stay in token order), and how each expert runs: `few` (at most ROWS pairs each)
    stream, expert few[j] owning sorted places begin[j]..end[j]; each of `blocks`, (expert, its places), runs as a
    matmul. The arrays are numpy views the kernels take as they are."""

    order: np.ndarray  # [P] the pair at each sorted place (torch.sort(ids.flatten(), stable=True).indices)
    where: np.ndarray  # [P] the sorted place of each pair (the inverse permutation)
    rows: np.ndarray  # [P] the token (input row) at each sorted place: order // k
    experts: np.ndarray  # [P] the expert at each sorted place
    few: np.ndarray
    begin: np.ndarray
    end: np.ndarray
    blocks: list[tuple[int, slice]]


def plan(ids: torch.Tensor, n_experts: int) -> Plan:
    """The `Plan` of CPU expert ids [N, k] in [0, n_experts), in one compiled pass (the torch ops it replaces, a
    sort, a bincount, an inverse and the splitting, cost about 20 µs a layer at a few tokens). Each expert's path
    depends on its own count only, so under expert parallelism it runs as on one process."""
    if ids.dtype != torch.int64:
        ids = ids.long()
    a = _array(ids)
    order, where, rows, experts = np.empty((4, a.size), np.int64)
    few, begin, end, counts = np.empty((4, n_experts), np.int64)
    n_few, n_big = _jit().plan(a, n_experts, ROWS, order, where, rows, experts, few, begin, end, counts)
    if n_few < 0:
        bad = a[(a < 0) | (a >= n_experts)]
        raise ValueError(f"expert id {int(bad[0])} is outside [0, {n_experts}) ({len(bad)} such ids)")
    blocks = []
    if n_big:
        starts = np.cumsum(counts) - counts
        blocks = [(int(e), slice(int(starts[e]), int(starts[e] + counts[e]))) for e in np.flatnonzero(counts > ROWS)]
    return Plan(order, where, rows, experts, few[:n_few], begin[:n_few], end[:n_few], blocks)


def select(scores: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None) -> torch.Tensor | None:
    """`routing.select_experts` of CPU fp32 scores [N, E] in one compiled pass, the same ids (the torch ops, a
    group ranking, masks and sorts, cost about 25 µs a layer at a few tokens); None where a score is NaN."""
    ids = np.empty((scores.shape[0], spec.top_k), np.int64)
    bias = _NONE_F.reshape(1) if correction_bias is None else _array(correction_bias.float())
    done = _jit().select(_array(scores), bias, correction_bias is not None, spec.groups, spec.topk_groups,
                         spec.group_score == "top2sum", ids)
    return torch.from_numpy(ids) if done else None


def moe_sum(outs: torch.Tensor, weights: torch.Tensor, where: np.ndarray | None = None) -> torch.Tensor:
    """`kernels.reference_moe_sum(outs, weights)` of fp32 outs [N, k, H] and weights [N, k] in one pass: the same
    products and sums in the same order (no fused multiply-adds), so the same bits. With `where` (a `Plan`'s),
    outs are the [N * k, H] outputs in sorted order, read in place of their gather into [N, k, H]."""
    n, k = weights.shape
    y = np.empty((n, outs.shape[-1]), np.float32)
    if n:
        places = indices(n * k) if where is None else where
        _at_torch_threads(_jit().moe_sum, _array(outs.contiguous()).reshape(n * k, -1), places,
                          _array(weights.float().contiguous()), y)
    return torch.from_numpy(y)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int, interleaved: bool) -> torch.Tensor:
    """`layers.Rotary.apply` of fp32 x [..., T, D] (any strides) in one call, bit for bit: at a few tokens torch's
    eight ops cost 12-19 µs against about 5 here."""
    out = torch.empty(x.shape, dtype=torch.float32)
    if x.numel():
        rows = x.reshape(-1, *x.shape[-2:])  # a view where the leading axes merge (always for one sequence)
        _jit().rope(_array(rows), _array(cos), _array(sin), dim, interleaved, out.numpy().reshape(rows.shape))
    return out


GLU_ACTIVATIONS = {F.silu: 0, F.gelu: 1}  # the activations `glu` computes, by code


def glu(gate: torch.Tensor, up: torch.Tensor, act: Callable, limit: float | None = None,
        alpha: float | None = None) -> torch.Tensor:
    """`Experts.glu` of fp32 [P, I] gate and up projections (act one of GLU_ACTIVATIONS), computed row by row: a
    row's values do not depend on which rows share the buffer, as a torch elementwise op's may (its vectorised
    body and scalar tail round transcendental functions differently), so expert parallelism stays exact."""
    out = torch.empty_like(gate)
    if len(gate):
        _at_torch_threads(_jit().glu, _array(gate), _array(up), GLU_ACTIVATIONS[act],
                          np.float32(limit or 0), np.float32(alpha or 0), out.numpy())
    return out


Index = torch.Tensor | np.ndarray  # int64, 1-D


def grouped_linear(x: torch.Tensor, rows: Index, experts: Index, begin: Index, end: Index,
                   weights: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor, ...] | None = None,
                   block: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """For each stacked weight W [E, out, in] of `weights` (projections of one input, such as gate and up, run in
    one pass), out[p] = W[experts[j]] @ x[rows[p]] for p in begin[j]..end[j]: fp32 [P, out] with P = len(rows)
    (rows outside every range are left unwritten), each listed expert's weight read once. `scales` and `block`
    as `Experts` holds them for quantised codes (FP8 codes with fp32 scales per `block`, or packed FP4 with e8m0
    exponents per 32 inputs). The int64 index arrays may be tensors or numpy arrays (a `Plan`'s)."""
    if len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"grouped_linear runs projections of one output size, got {[w.shape for w in weights]}")
    outs = tuple(torch.empty(len(rows), w.shape[1], dtype=torch.float32) for w in weights)
    if len(rows) and len(experts):
        index = (i.numpy() if isinstance(i, torch.Tensor) else i for i in (rows, experts, begin, end))
        _call(_array(x.contiguous()), *index, *_held(weights, scales, block), tuple(o.numpy() for o in outs))
    return outs


def reference_grouped_linear(x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor, begin: torch.Tensor,
                             end: torch.Tensor, weights: tuple[torch.Tensor, ...],
                             scales: tuple[torch.Tensor, ...] | None = None,
                             block: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """`grouped_linear` in torch ops (one matmul per expert on dequantised weights; unwritten rows zero): the same
    values within fp32 summation-order rounding."""
    outs = []
    for n, weight in enumerate(weights):
        out = torch.zeros(len(rows), weight.shape[1], dtype=torch.float32)
        for j, e in enumerate(experts.tolist()):
            w = weight[e] if scales is None else quant.dequantize(weight[e], scales[n][e], block or (1, 1))
            pairs = slice(int(begin[j]), int(end[j]))
            out[pairs] = x[rows[pairs]].float() @ w.float().T
        outs.append(out)
    return tuple(outs)


_FP8, _FP4, _E8M0 = quant.DECODE_TABLES
_NONE_F, _NONE_U = np.zeros((1, 1, 1), np.float32), np.zeros((1, 1, 1), np.uint8)
_NONE_F1, _NONE_U1 = (_NONE_F,), (_NONE_U,)
_ZERO = np.zeros(1, np.int64)


def _array(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor (detached first only where it requires grad: the common case skips it)."""
    return (t.detach() if t.requires_grad else t).numpy()


@functools.cache
def indices(n: int) -> np.ndarray:
    """0..n-1 (cached; not to be written: a dense linear's rows, and its one range's end as the last element)."""
    return np.arange(n, dtype=np.int64)


def _held(weights: tuple[torch.Tensor, ...], scales: tuple[torch.Tensor, ...] | None,
          block: tuple[int, int] | None) -> tuple:
    """The kernel's weight operands (fmt, wf, wq, sf, sq, bo, bi) for weights held as fp32 (fmt 0), or as codes
    with `scales` (FP8 with its `block`: fmt 1, else packed FP4: fmt 2), 2-D weights taken as one expert; the
    unused operands are 1-element placeholders (one compiled kernel serves every format)."""
    n = len(weights)
    none_f, none_u = (_NONE_F,) * n, (_NONE_U,) * n
    if scales is None:
        return 0, tuple(_stacked(w) for w in weights), none_u, none_f, none_u, 1, 1
    wq = tuple(_stacked(w.view(torch.uint8)) for w in weights)
    if weights[0].dtype == quant.FP8:
        return (1, none_f, wq, tuple(_stacked(s.float()) for s in scales), none_u, *block)
    return 2, none_f, wq, none_f, tuple(_stacked(s.view(torch.uint8)) for s in scales), 1, 1


def _dense(weights: tuple[torch.Tensor, ...]) -> tuple:
    """`_held` of fp32 weights [out, in] (the common dense call, with fewer steps than the general path's)."""
    if len(weights) == 1:
        return 0, (_array(weights[0])[None],), _NONE_U1, _NONE_F1, _NONE_U1, 1, 1
    return _held(weights, None, None)


def _stacked(t: torch.Tensor) -> np.ndarray:
    """`_array(t)` with a leading expert axis of one added to a 2-D (dense) weight."""
    a = _array(t)
    return a[None] if a.ndim == 2 else a


def _call(x: np.ndarray, rows: np.ndarray, experts: np.ndarray, begin: np.ndarray, end: np.ndarray, fmt: int,
          wf: tuple, wq: tuple, sf: tuple, sq: tuple, bo: int, bi: int, outs: tuple[np.ndarray, ...]) -> None:
    """The kernel on its numpy operands."""
    _at_torch_threads(_jit().kernel, x, rows, experts, begin, end, fmt, wf, wq, sf, sq, bo, bi, _FP8, _FP4, _E8M0,
                      outs)


def _at_torch_threads(kernel: Callable, *args: object) -> None:
    """kernel(*args) on torch's thread count. The first call goes through `parallel.torch_threads`, which also
    undoes what launching numba's threads does to torch's count; later ones skip its context manager (a cost
    on every small call) while numba's count (read by a compiled call: numba's Python getter costs 0.5 µs)
    already equals torch's."""
    jit = _jit()
    if _launched and jit.threads() == torch.get_num_threads():
        kernel(*args)
        return
    with torch_threads():
        kernel(*args)
    _launched.append(True)


_launched: list[bool] = []  # non-empty once a kernel ran inside `torch_threads` (numba's threads are up)


@functools.cache
def _jit() -> ModuleType:
    """workbench.models.stream_jit: numba imported and the kernels loaded on first use."""
    from . import stream_jit

    return stream_jit
