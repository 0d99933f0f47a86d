"""The MoE block: router, routed experts (run by one of three backends), optional shared expert, per-expert hooks,
and expert parallelism.

Backends (`MoE.backend`, set by `workbench.load`): "torch" runs the experts one at a time (the reference loop),
"grouped" sorts the (token, slot) pairs by expert so each expert's rows are one contiguous matmul (the CPU fast
path), "triton" runs the fused kernels of `workbench.kernels`. Whichever runs, the `experts.hidden` and
`experts.out` hooks see token-major [B, T, k, D] tensors.

Expert parallelism (`MoE.parallel`, set by `workbench.load` under torchrun): each rank holds a contiguous range of
the routed experts and everything else replicated, and every rank runs the same program on the same tokens.
Within the block:

1. the router runs on every token on every rank, so the `router.*` hooks see the whole [B, T, ...] tensors
   (global expert ids) on every rank, and an edit made by a hook applies everywhere;
2. rank r takes the r-th contiguous share of the token rows, sends each (token, slot) pair's input row to the
   rank owning its expert (one all-to-all), the owners run their experts on the rows they received with the
   model's backend, a second all-to-all returns the outputs, and rank r weighs and sums them (`MoE.combine`);
3. an all-gather gives every rank the whole routed output again, and every rank adds the shared expert, which
   it runs on every token.

The result equals one process's bit for bit (on CPUs, with as many threads per process): each expert's matmuls
see the same rows in the same order as one process's (a CPU matmul over another number of rows may round
otherwise, which is also why the shared expert runs on all the tokens), and every backend sums the k weighted
outputs of a token in one way (`MoE.combine`).
Which rank sends how many rows where follows from the replicated routing, so no counts are exchanged.
`experts.hidden` / `experts.out` hooks, when registered, get the whole token-major tensors (assembled by an
all-reduce, every pair filled by exactly its owner); with none registered nothing extra moves.
`workbench.distributed` holds the process group, the collectives and each rank's share (`ExpertParallel`, whose
check makes every rank run a forward with the same hooks and tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed, quant
from ..hooks import HookPoint, HookRegistry
from ..kernels import reference_moe_sum
from ..routing import RouterSpec, router_scores, select_experts, selection_margin, weigh_experts
from . import stream
from .layers import MLP, Linear, recording

# passes a backend's per-pair tensor [N, k, D] (pair = (row, slot)) through a per-expert hook point
Tap = Callable[[HookPoint, torch.Tensor], torch.Tensor]


class Router(nn.Module):
    """Linear router with the family's selection rule; fires the `router.*` hooks in the order they are made.

    Selection may use a correction bias and group limits; the weights are then computed for the
    (possibly hook-edited) ids, so forcing ids yields the weights the router would give those experts.
    `router.margin` [B, T] (computed only while hooked): the k-th minus the (k+1)-th selection score
    (`routing.selection_margin`), how near the token is to a change of selection; routers whose selection
    is no top-k of scores (`margins = False`: hash routing) have no such point.
    """

    margins = True  # whether selection is a top-k of scores, so `router.margin` exists

    def __init__(self, hidden: int, spec: RouterSpec, hooks: HookRegistry, prefix: str):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.experts, hidden))
        self.bias = nn.Parameter(torch.empty(spec.experts)) if spec.logit_bias else None
        self.correction_bias = nn.Parameter(torch.empty(spec.experts)) if spec.correction_bias else None
        self.hp_logits = hooks.point(f"{prefix}.router.logits")
        self.hp_scores = hooks.point(f"{prefix}.router.scores")
        self.hp_margin = hooks.point(f"{prefix}.router.margin") if self.margins else None
        self.hp_ids = hooks.point(f"{prefix}.router.topk_ids")
        self.hp_weights = hooks.point(f"{prefix}.router.topk_weights")
        self.backend = "torch"  # "triton": select and weigh in one kernel (workbench.kernels.route)

    def select(self, scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids [N, k] from fp32 scores [N, E] of tokens `token_ids` [N]; ties go to the lower index."""
        if len(scores) <= stream.ROWS and scores.device.type == "cpu" and scores.dtype == torch.float32:
            ids = stream.select(scores, self.spec, self.correction_bias)  # the same ids in one compiled pass
            if ids is not None:
                return ids
        return select_experts(scores, self.spec, self.correction_bias)

    def weigh(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Weights [N, k] that multiply the outputs of experts `ids`."""
        return weigh_experts(scores, ids, self.spec)

    def forward(self, x: torch.Tensor, shape: tuple[int, ...],
                token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route flat tokens x [N, H] with ids [N]; hooks see token-major tensors of `shape` [B, T, ...]."""
        logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        logits = self.hp_logits(logits.view(*shape, -1)).flatten(0, -2)
        margin = self.hp_margin is not None and self.hp_margin.active
        if self.backend == "triton" and not self.hp_scores.active and not margin \
                and type(self).select is Router.select and not recording(logits):
            from ..kernels import route

            chosen, weights = route(logits, self.spec, self.correction_bias)
            ids = self.hp_ids(chosen.view(*shape, -1)).flatten(0, -2)
            if not torch.equal(ids, chosen):
                weights = self.weigh(router_scores(logits, self.spec.score), ids)  # a hook chose other experts
            weights = weights.view(*shape, -1)
        else:
            scores = self.hp_scores(router_scores(logits, self.spec.score).view(*shape, -1)).flatten(0, -2)
            if margin:
                self.hp_margin(selection_margin(scores, self.spec, self.correction_bias).view(shape))
            ids = self.hp_ids(self.select(scores, token_ids).view(*shape, -1)).flatten(0, -2)
            weights = self.weigh(scores, ids).view(*shape, -1)
        weights = self.hp_weights(weights, topk_ids=ids.view(*shape, -1)).flatten(0, -2)
        return ids, weights


def expert_blocks(ends: list[int]) -> Iterator[tuple[int, slice]]:
    """(expert, its rows) of rows sorted by expert, expert e owning rows ends[e-1]..ends[e]; empty experts skipped."""
    for e, (start, end) in enumerate(zip([0, *ends], ends)):
        if end > start:
            yield e, slice(start, end)


class Experts(nn.Module):
    """Routed experts stored stacked ([E, I, H] gate/up, [E, H, I] down), computed one expert at a time.

    `limit` clamps gate above and up both sides before the GLU (DeepSeek-V4, GPT-OSS); `alpha` selects
    GPT-OSS's variant out = (up + 1) * gate * sigmoid(alpha * gate) instead of act(gate) * up.

    Quantised (`hold_quantised`, as `workbench.load` keeps them), each projection holds its codes and
    `{name}_scale` holds their scales in `workbench.quant`'s layout, with the scale grid's `block`; `weight`
    dequantises one expert at a time into one reused buffer, so memory stays at the stored size.
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, n: int, hidden: int, inter: int, act: Any = F.silu, *, bias: bool = False,
                 limit: float | None = None, alpha: float | None = None):
        super().__init__()
        self.act, self.limit, self.alpha = act, limit, alpha
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        self.gate_proj_scale = self.up_proj_scale = self.down_proj_scale = None
        self.block: tuple[int, int] | None = None  # scale grid of quantised codes
        self._buffer: torch.Tensor | None = None  # one expert's dequantised weight, reused
        if bias:
            self.gate_bias = nn.Parameter(torch.empty(n, inter))
            self.up_bias = nn.Parameter(torch.empty(n, inter))
            self.down_bias = nn.Parameter(torch.empty(n, hidden))
        else:
            self.gate_bias = self.up_bias = self.down_bias = None

    def hold_quantised(self, fp4: bool, block: tuple[int, int]) -> None:
        """Replace the float projections by empty codes and scales in `workbench.quant`'s layout (FP8 e4m3 codes
        with fp32 scales per `block`, or FP4 codes with e8m0 exponents per 32 inputs), on the same device."""
        for name in self.PROJECTIONS:
            w = getattr(self, name)
            codes = torch.empty(quant.held_shape(w.shape, fp4), dtype=torch.uint8 if fp4 else quant.FP8,
                                device=w.device)
            scale = torch.empty(quant.fp8_scale_shape(w.shape, block), dtype=torch.uint8 if fp4 else torch.float32,
                                device=w.device)
            setattr(self, name, nn.Parameter(codes, requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(scale, requires_grad=False))
        self.block = block

    def weight(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's `name` projection [out, in] for inputs x: the parameter itself when unquantised, else
        dequantised to x's dtype into the reused buffer (into a fresh tensor when autograd records x's graph,
        which keeps what it saves)."""
        w, scale = getattr(self, name)[e], getattr(self, f"{name}_scale")
        if scale is None:
            return w
        shape = (w.shape[0], w.shape[1] * 2 if w.dtype == torch.uint8 else w.shape[1])
        if recording(x):
            out = torch.empty(shape, dtype=x.dtype, device=w.device)
        else:
            buf = self._buffer
            if buf is None or buf.dtype != x.dtype or buf.device != w.device:
                buf = self._buffer = torch.empty(self.gate_proj.shape[1] * self.down_proj.shape[1], dtype=x.dtype,
                                                 device=w.device)
            out = buf[: math.prod(shape)].view(shape)
        return quant.dequantize_into(out, w, scale[e], self.block)

    def recording(self, *tensors: torch.Tensor) -> bool:
        """Whether autograd records an op on `tensors` or on the expert weights (trainable once a user asks for
        their gradients): the kernels and in-place writes, which autograd cannot follow, are then avoided."""
        return torch.is_grad_enabled() and recording(*tensors, self.gate_proj, self.up_proj, self.down_proj)

    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's activated hidden state for rows x [n, H]."""
        gate = F.linear(x, self.weight("gate_proj", e, x), None if self.gate_bias is None else self.gate_bias[e])
        up = F.linear(x, self.weight("up_proj", e, x), None if self.up_bias is None else self.up_bias[e])
        return self.glu(gate, up)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The gated activation of gate and up projections (clamped first where the family clamps)."""
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        if self.alpha is None:
            return self.act(gate) * up
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    def grouped_hidden(self, rows: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """Activated hidden states of rows [n, H] sorted by expert (expert e owns rows ends[e-1]..ends[e]): each
        expert's rows one contiguous block, written in place; the activation stays per block, in cache."""
        hidden = rows.new_empty(len(rows), self.gate_proj.shape[1])
        for e, block in expert_blocks(ends):
            hidden[block] = self.hidden(e, rows[block])
        return hidden

    def streamed_hidden(self, x: torch.Tensor, plan: stream.Plan) -> torch.Tensor:
        """Activated hidden states [P, I] of the plan's pairs in sorted order (sorted place p reads row
        x[plan.rows[p]]): its few-row experts through the streaming kernel, gate and up in one pass over their
        codes or weights, then `stream.glu`; the other experts as `hidden`."""
        return self._streamed(x, plan.rows, plan, ("gate_proj", "up_proj"), self.hidden)

    def streamed_down(self, hidden: torch.Tensor, plan: stream.Plan) -> torch.Tensor:
        """Outputs [P, H] of activated hidden rows in the plan's sorted order, split between the kernel and `down`
        as in `streamed_hidden`."""
        return self._streamed(hidden, stream.indices(len(hidden)), plan, ("down_proj",), self.down)

    def _streamed(self, x: torch.Tensor, rows: np.ndarray, plan: stream.Plan, names: tuple[str, ...],
                  matmul: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        outs = stream.grouped_linear(
            x, rows, plan.few, plan.begin, plan.end, tuple(getattr(self, n) for n in names),
            None if self.block is None else tuple(getattr(self, f"{n}_scale") for n in names), self.block)
        biases = [getattr(self, n.removesuffix("_proj") + "_bias") for n in names]
        if biases[0] is not None:
            experts = torch.from_numpy(plan.experts)
            outs = tuple(o + b[experts] for o, b in zip(outs, biases))
        out = stream.glu(*outs, self.act, self.limit, self.alpha) if len(outs) == 2 else outs[0]
        for e, block in plan.blocks:
            out[block] = matmul(e, x[torch.from_numpy(rows[block])])
        return out

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's output for activated hidden rows h [n, I]."""
        return F.linear(h, self.weight("down_proj", e, h), None if self.down_bias is None else self.down_bias[e])

    def grouped_down(self, hidden: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """Outputs [n, H] of activated hidden rows sorted by expert (as in `grouped_hidden`)."""
        out = hidden.new_empty(len(hidden), self.down_proj.shape[1])
        for e, block in expert_blocks(ends):
            out[block] = self.down(e, hidden[block])
        return out


class MoE(nn.Module):
    """Router + routed experts + optional (gated) shared expert, with the per-expert hooks.

    Per-expert hidden/out tensors are only materialised (token-major, [B,T,k,*]) while a hook asks
    for them; otherwise each expert's rows are scattered straight into the output. With `parallel` set
    (expert parallelism) `experts` holds only this rank's range of experts.
    """

    def __init__(self, hidden: int, spec: RouterSpec, inter: int, hooks: HookRegistry, prefix: str, *,
                 act: Any = F.silu, shared_inter: int | None = None, shared_gate: bool = False,
                 expert_bias: bool = False, limit: float | None = None, alpha: float | None = None,
                 router: type[Router] | None = None):
        super().__init__()
        self.router = (router or Router)(hidden, spec, hooks, prefix)
        self.experts = Experts(spec.experts, hidden, inter, act, bias=expert_bias, limit=limit, alpha=alpha)
        self.shared = MLP(hidden, shared_inter, act, limit) if shared_inter else None
        self.shared_gate = Linear(hidden, 1, bias=False) if shared_gate else None
        self.hp_hidden = hooks.point(f"{prefix}.experts.hidden")
        self.hp_expert_out = hooks.point(f"{prefix}.experts.out")
        self.hp_shared = hooks.point(f"{prefix}.shared.out") if self.shared is not None else None
        self.hp_out = hooks.point(f"{prefix}.moe.out")
        self.parallel: distributed.ExpertParallel | None = None  # this rank's share of the experts, expert-parallel
        self.backend = "torch"  # how routed experts run: "torch" (reference loop), "grouped", "triton"

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] of tokens token_ids [B, T] (hash routing selects by token id)."""
        shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if self.parallel is not None:
            return self.hp_out(self._expert_parallel(flat, token_ids.reshape(-1), shape).view_as(x))
        ids, weights = self.router(flat, shape, token_ids.reshape(-1))
        y = self.routed(flat, ids, weights.to(x.dtype), shape)
        if self.shared is not None:
            y = y + self.hp_shared(self.shared_out(flat).view_as(x)).view_as(flat)
        return self.hp_out(y.view_as(x))

    def shared_out(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's output for rows x [n, H], gated where the family gates it."""
        s = self.shared(x)
        return torch.sigmoid(self.shared_gate(x)) * s if self.shared_gate is not None else s

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shape: tuple[int, ...],
               tap: Tap | None = None) -> torch.Tensor:
        """Sum_k weights[:, k] * expert_{ids[:, k]}(x) by the backend. The per-expert hooks see the [N, k, D] pair
        tensors through `tap`: by default token-major [*shape, k, D] (expert parallelism taps whole tensors)."""
        tap = tap or _token_major(ids, shape)
        if self.backend == "grouped" or self.backend == "triton" and self.experts.recording(x, weights):
            return self.grouped(x, ids, weights, tap)  # the kernels have no backward: torch ops under autograd
        if self.backend == "triton":
            return self.fused(x, ids, weights, tap)
        return self.loop(x, ids, weights, tap)

    def combine(self, outs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y [N, D] = sum_j weights[:, j] * outs[:, j] of expert outputs [N, k, D]: products and sum in fp32, slots in
        order, one rounding to the activation dtype (`kernels.reference_moe_sum`, which the `moe_sum` kernel
        reproduces). Every backend sums this way, hooked or not, on one process or expert-parallel, so that all
        of them give one result."""
        if self.backend == "triton" and not recording(outs, weights):
            from ..kernels import moe_sum

            return moe_sum(outs, weights)
        if outs.device.type == "cpu" and outs.dtype == weights.dtype == torch.float32 and not recording(outs, weights):
            return stream.moe_sum(outs, weights)  # the reference's sums in one pass
        return reference_moe_sum(outs, weights)

    def loop(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, tap: Tap) -> torch.Tensor:
        """The "torch" backend, the reference: one expert at a time over the (token, slot) pairs that chose it."""
        N, k = ids.shape
        groups = [(e, *torch.where(ids == e)) for e in ids.unique().tolist()]
        hidden = None
        if self.hp_hidden.active:
            hidden = x.new_zeros(N, k, self.experts.gate_proj.shape[1])
            for e, tok, slot in groups:
                hidden[tok, slot] = self.experts.hidden(e, x[tok])
            hidden = tap(self.hp_hidden, hidden)
        outs = x.new_zeros(N, k, x.shape[-1])
        for e, tok, slot in groups:
            h = hidden[tok, slot] if hidden is not None else self.experts.hidden(e, x[tok])
            outs[tok, slot] = self.experts.down(e, h)
        if self.hp_expert_out.active:
            outs = tap(self.hp_expert_out, outs)
        return self.combine(outs, weights)

    def grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, tap: Tap) -> torch.Tensor:
        """The "grouped" backend: the pairs sorted by expert, one gather, each expert's rows one contiguous matmul,
        the outputs put back in pair order and combined (the CPU fast path). Per-expert hooks get per-pair copies
        of the sorted buffers, made only while a hook asks."""
        N, k = ids.shape
        graph = self.experts.recording(x)  # autograd follows the experts: torch ops, nothing written in place
        if (stream.streams(x, self.experts.gate_proj) and not graph
                and (self.experts.alpha is not None or self.experts.act in stream.GLU_ACTIVATIONS)):
            plan = stream.plan(ids, self.experts.gate_proj.shape[0])
            if len(plan.few):
                return self.streamed(x, plan, weights, tap)
        pairs = ids.flatten()
        order = torch.sort(pairs, stable=True).indices  # row-major within each expert
        counts = torch.bincount(pairs, minlength=self.experts.gate_proj.shape[0])
        ends = counts.cumsum(0).tolist()
        rows = x[order // k]
        if self.hp_hidden.active:
            hidden = self.experts.grouped_hidden(rows, ends)
            hidden = tap(self.hp_hidden, _by_pair(hidden, order, k)).flatten(0, 1)[order]
            out = self.experts.grouped_down(hidden, ends)
        else:  # each block's activation stays in cache; its output overwrites its input rows unless autograd
            keep = None
            if rows.device.type == "cpu" and rows.dtype in (torch.bfloat16, torch.float16) and not graph:
                rows, ends, keep = pad_blocks(rows, pairs[order], ends, ROW_BUCKET)
            out = torch.empty_like(rows) if graph else rows  # needs them
            for e, block in expert_blocks(ends):
                out[block] = self.experts.down(e, self.experts.hidden(e, rows[block]))
            if keep is not None:
                out = out[keep]
        outs = _by_pair(out, order, k)
        if self.hp_expert_out.active:
            outs = tap(self.hp_expert_out, outs)
        return self.combine(outs, weights)

    def streamed(self, x: torch.Tensor, plan: stream.Plan, weights: torch.Tensor, tap: Tap) -> torch.Tensor:
        """The "grouped" backend at a few rows per expert (fp32 on the CPU): each projection of all the few-row
        experts streamed in one kernel pass (`workbench.models.stream`), experts with more rows as matmuls. Unhooked,
        the outputs are summed where they lie in sorted order."""
        k = weights.shape[1]
        hidden = self.experts.streamed_hidden(x.contiguous(), plan)
        if self.hp_hidden.active:
            order = torch.from_numpy(plan.order)
            hidden = tap(self.hp_hidden, _by_pair(hidden, order, k)).flatten(0, 1)[order]
        out = self.experts.streamed_down(hidden, plan)
        if not self.hp_expert_out.active and not recording(weights):
            return stream.moe_sum(out, weights, plan.where)  # `combine`'s sums, without the gather
        return self.combine(tap(self.hp_expert_out, _by_pair(out, torch.from_numpy(plan.order), k)), weights)

    def fused(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, tap: Tap) -> torch.Tensor:
        """The "triton" backend (workbench.kernels): row gather, grouped GEMMs and the gated activation fused.
        Quantised experts go in as held (codes, scales and their block). Per-expert hooks read the kernels' own
        per-pair intermediates; after a hook edits them the later stages rerun on the edit."""
        from ..kernels import expert_out, fused_experts

        ex = self.experts
        if ex.alpha is None and ex.act is not F.silu:
            return self.grouped(x, ids, weights, tap)  # the kernels fuse SiLU gates (and GPT-OSS's) only
        want_hidden, want_out = self.hp_hidden.active, self.hp_expert_out.active
        biases = None if ex.gate_bias is None else (ex.gate_bias, ex.up_bias, ex.down_bias)
        held = {} if ex.block is None else dict(block=ex.block)
        scales = None if ex.block is None else (ex.gate_proj_scale, ex.up_proj_scale, ex.down_proj_scale)
        y, hidden, outs = fused_experts(x, ids, weights, ex.gate_proj, ex.up_proj, ex.down_proj, limit=ex.limit,
                                        alpha=ex.alpha, biases=biases, scales=scales, want_hidden=want_hidden,
                                        want_out=want_out, **held)
        if want_hidden:
            edited = tap(self.hp_hidden, hidden)
            if not torch.equal(edited, hidden):
                outs = expert_out(edited, ids, None, ex.down_proj, bias=ex.down_bias, scale=ex.down_proj_scale,
                                  **held)
                y = self.combine(outs, weights)
        if want_out:
            outs = tap(self.hp_expert_out, outs)
            y = self.combine(outs, weights)
        return y

    def _expert_parallel(self, x: torch.Tensor, token_ids: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The block over flat tokens x [n, H] (the same on every rank) with this rank's experts, run by the
        backend on the rows this rank receives (see the module docstring); returns the block output [n, H]
        (before the `moe.out` hook), the same on every rank and the same as one process's."""
        ep = self.parallel
        ids, weights = self.router(x, shape, token_ids)
        n, k = ids.shape
        weights = weights.to(x.dtype)
        lo, hi = ep.rows(n)
        owner = ep.owner(ids).flatten()  # [n * k] rank of each (token, slot) pair
        source = torch.bucketize(torch.arange(n, device=x.device), torch.tensor(
            [ep.rows(n, r)[0] for r in range(1, ep.world)], device=x.device), right=True).repeat_interleave(k)
        counts = torch.bincount(source * ep.world + owner, minlength=ep.world**2).view(ep.world, ep.world).tolist()
        send, recv = counts[ep.rank], [counts[s][ep.rank] for s in range(ep.world)]

        # dispatch: this rank's pairs, ordered by owner (stable, so row-major within each owner)
        pair = torch.sort(owner[lo * k:hi * k], stable=True).indices + lo * k  # global pair index of each row sent
        got = distributed.all_to_all_rows(x[pair // k], send, recv)
        # received rows, by source rank then row-major: exactly the pairs this rank owns, in flat order, so each
        # expert's rows are the ones it gets on one process, in the same order
        held = (owner == ep.rank).nonzero().squeeze(1)
        local = ids.flatten()[held, None] - ep.owned.start  # each row one pair [m, 1] of this rank's experts
        token_major = _token_major(ids, shape)

        def whole(hp: HookPoint, t: torch.Tensor) -> torch.Tensor:
            """Hooks see the whole token-major tensor (every pair filled by its owner); this rank keeps its pairs."""
            full = distributed.all_reduce_rows(t.flatten(0, 1), held, n * k)
            return token_major(hp, full.view(n, k, -1)).flatten(0, 1)[held, None]

        out = self.routed(got, local, got.new_ones(local.shape), shape, whole)  # unweighted (weights 1: exact)
        back = distributed.all_to_all_rows(out, recv, send)  # combine: outputs return in the order sent
        outs = torch.empty_like(back)
        outs[pair - lo * k] = back  # this rank's rows' pairs, token-major
        y = distributed.all_gather_rows(self.combine(outs.view(hi - lo, k, x.shape[-1]), weights[lo:hi]), ep, n)
        if self.shared is not None:
            y = y + self.hp_shared(self.shared_out(x).view(*shape, -1)).flatten(0, -2)
        return y


def _token_major(ids: torch.Tensor, shape: tuple[int, ...]) -> Tap:
    """The tap of one process: pair tensors [N, k, D] shown to a hook as [*shape, k, D] with their expert ids."""
    n, k = ids.shape

    def tap(hp: HookPoint, t: torch.Tensor) -> torch.Tensor:
        return hp(t.view(*shape, k, -1), topk_ids=ids.view(*shape, k)).reshape(n, k, -1)

    return tap


ROW_BUCKET = 64  # CPU bf16/fp16 expert blocks of more than half this many rows are padded to a multiple of it


def padded_size(n: int, bucket: int) -> int:
    """The rows an expert block of n rows is padded to (`pad_blocks`): the next power of two up to bucket / 2, so
    that the few-row blocks of a short prompt or a decode step stay few-row, else the next multiple of `bucket`."""
    if n > bucket // 2:
        return -(-n // bucket) * bucket
    return 1 << (n - 1).bit_length() if n > 1 else n


def pad_blocks(rows: torch.Tensor, experts: torch.Tensor, ends: list[int], bucket: int
               ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Rows sorted by expert (`experts[i]` owns row i; `ends` as in `expert_blocks`) copied into blocks padded
    with zero rows to `padded_size`: (padded rows, their ends, where each row went). oneDNN, which runs CPU
    bf16/fp16 matmuls, builds and caches a kernel for every distinct row count: about 1 ms and 0.7 MB each, so
    unpadded expert blocks, whose sizes change with every batch, spend more time building kernels than
    multiplying and grow the process by gigabytes over a long trace. Padded, a few sizes recur: 1, 2, 4, ...,
    bucket / 2 and multiples of the bucket (padding one row to a whole bucket made a decode step do up to 64
    times the expert work: forwards of 1, 8 and 32 tokens ran 1.3x, 1.6x and 1.6x slower)."""
    sizes = [ends[0], *(b - a for a, b in zip(ends, ends[1:]))]
    counts, padded = torch.tensor(sizes), torch.tensor([padded_size(n, bucket) for n in sizes])
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # padded start - start, per expert
    where = torch.arange(len(rows)) + shift[experts]
    out = rows.new_zeros(int(padded.sum()), rows.shape[-1])
    out[where] = rows
    return out, padded.cumsum(0).tolist(), where


def _by_pair(rows: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Rows sorted by expert (row i holds pair order[i]) as the per-pair tensor [N, k, D] (a gather by the inverse
    permutation: a CPU row gather is faster than the scatter `out[order] = rows`)."""
    return rows.index_select(0, torch.argsort(order)).view(len(rows) // k, k, rows.shape[-1])
