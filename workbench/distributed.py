"""Expert parallelism over torch.distributed: each rank holds a contiguous range of every MoE layer's routed
experts and everything else (embeddings, attention, norms, routers, shared experts) replicated.

Launch with torchrun (`torchrun --nproc-per-node N -m workbench trace ...`, or a script calling `init()` then
`wb.load`). Every rank runs the same program on the same tokens. Within an MoE block:

1. the router runs on every token on every rank, so the `router.*` hooks see the whole [B, T, ...] tensors
   (global expert ids) on every rank, and an edit made by a hook applies everywhere;
2. rank r takes the r-th contiguous share of the token rows, sends each (token, slot) pair's input row to the
   rank owning its expert (one all-to-all), the owners run their experts, a second all-to-all returns the
   outputs, and rank r weighs and sums them and adds its rows' shared expert;
3. an all-gather gives every rank the whole block output again.

Which rank sends how many rows where follows from the replicated routing, so no counts are exchanged.
`experts.hidden` / `experts.out` / `shared.out` hooks, when registered, get the whole token-major tensors
(assembled by an all-reduce, every pair filled by exactly its owner); with none registered nothing extra
moves. The hooks registered must be the same on every rank (a torchrun script registers them alike): each
forward checks this, and that the token ids agree, with one small all-gather, and raises HookError otherwise.

Tensor parallelism (opt-in, where a family's attention has `split_heads`: DeepSeek-V4) splits attention heads
over groups of T consecutive ranks (`head_group`); each attention module sums its output over its group.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist

from .errors import CheckpointError, HookError, InputError

# the error another rank's failure is raised as here, by that failure's type name
_OTHER_RANK = {"CheckpointError": CheckpointError, "InputError": InputError, "HookError": HookError,
               "StoreError": ValueError, "ValueError": ValueError, "FileNotFoundError": FileNotFoundError}

if TYPE_CHECKING:
    from .hooks import HookRegistry
    from .models.blocks import MoE


def init(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (env WORLD_SIZE, RANK, MASTER_ADDR...) if not yet joined:
    NCCL on CUDA machines (each rank on GPU LOCAL_RANK), gloo on CPU; returns (rank, world size), (0, 1) alone."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
        faulthandler.enable()  # a rank that aborts in C++ (a collective library) still says where Python was
    return rank_and_world()


def shutdown(wait: bool = True) -> None:
    """Leave the process group, if joined. With `wait`, every rank first meets at a barrier: a rank tearing
    gloo down while another still sends to it can abort the process at exit."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a torchrun rank with `code`, without interpreter finalization: call it once the process group is
    destroyed and every file closed. A rank was seen to abort while finalizing after a complete run (SIGABRT,
    "terminate called without an active exception", rarely), which fails the whole torchrun."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) where none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def agreed(active: bool = True) -> Iterator[None]:
    """Run the block on every rank and fail on every rank if it failed on any (else the others would wait in
    the next collective forever): a rank's own error is raised as is, another rank's as an error of the same
    kind naming that rank. Inactive (or alone), just the block."""
    if not active or rank_and_world()[1] == 1:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:
        error = e
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, (kind, message) = failed[0]
        raise _OTHER_RANK.get(kind, RuntimeError)(f"rank {r} failed: {kind}: {message}")


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def head_group(size: int) -> tuple[int, Any]:
    """This rank's index within its tensor-parallel group of `size` consecutive ranks, and that process group
    (every rank creates every group, in the same order, as torch.distributed requires)."""
    rank, world = rank_and_world()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return rank % size, mine


def expert_bounds(experts: int, world: int) -> tuple[int, ...]:
    """Rank r owns experts [bounds[r], bounds[r + 1]): contiguous ranges whose sizes differ by at most one."""
    return tuple(r * experts // world for r in range(world + 1))


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in expert parallelism: which experts it holds (per MoE layer, the same range)."""

    rank: int
    world: int
    experts: int  # routed experts per layer, all ranks together

    @property
    def bounds(self) -> tuple[int, ...]:
        return expert_bounds(self.experts, self.world)

    @property
    def owned(self) -> range:
        """Global ids of this rank's experts."""
        return range(self.bounds[self.rank], self.bounds[self.rank + 1])

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        """The rank holding each expert id."""
        inner = torch.tensor(self.bounds[1:-1], device=ids.device, dtype=ids.dtype)
        return torch.bucketize(ids.contiguous(), inner, right=True)

    def rows(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """The token rows [start, stop) of `n` that `rank` (default: this one) dispatches and combines."""
        r = self.rank if rank is None else rank
        return r * n // self.world, (r + 1) * n // self.world

    def check_forward(self, hooks: HookRegistry, input_ids: torch.Tensor) -> None:
        """Raise HookError unless every rank runs this forward with the same hooks registered and the same
        token ids (the collectives of a forward depend on both)."""
        names = ",".join(n for n, hp in hooks.points.items() if hp.active)
        ids = input_ids.flatten().to(torch.float64)
        mine = torch.tensor([zlib.crc32(names.encode()), input_ids.shape[0], input_ids.shape[1],
                             float((ids * torch.arange(1, ids.numel() + 1, dtype=torch.float64,
                                                       device=ids.device)).sum())], dtype=torch.float64)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine.to(_device(input_ids)))
        every = [t.cpu() for t in every]
        for r, theirs in enumerate(every):
            if theirs[0] != mine[0]:
                raise HookError(f"rank {self.rank} and rank {r} have different hooks registered; register the "
                                "same hooks on every rank (expert parallelism runs the same forward everywhere)")
            if not torch.equal(theirs[1:], mine[1:]):
                raise HookError(f"rank {self.rank} and rank {r} were given different token ids; every rank must "
                                "run the same tokens")


def _device(t: torch.Tensor) -> torch.device:
    """Where collectives of the default group want tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _all_gather_rows(rows: torch.Tensor, ep: ExpertParallel, n: int) -> torch.Tensor:
    """Every rank's share of `n` rows (this rank's is `rows`), concatenated in rank order: [n, ...]."""
    size = -(-n // ep.world)
    padded = rows.new_zeros(size, *rows.shape[1:])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(ep.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, (ep.rows(n, r) for r in range(ep.world)))])


def _exchange(rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """One all-to-all: `send[r]` consecutive rows go to rank r; returns the rows received, by source rank."""
    out = rows.new_empty(sum(recv), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), recv, send)
    return out


def _whole(hp: Any, pairs: torch.Tensor, values: torch.Tensor, n: int, k: int, shape: tuple[int, ...],
           ids: torch.Tensor) -> torch.Tensor:
    """The token-major [n, k, D] tensor of a per-expert hook from each rank's (pair, value) rows, through the hook."""
    full = values.new_zeros(n * k, values.shape[-1])
    full[pairs] = values
    dist.all_reduce(full)  # every pair is filled by exactly one rank
    return hp(full.view(*shape, k, -1), topk_ids=ids.view(*shape, k)).view(n, k, -1)


def moe_forward(moe: MoE, x: torch.Tensor, token_ids: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The MoE block over flat tokens x [n, H] (the same on every rank) with this rank's experts; returns the
    block output [n, H] (before the `moe.out` hook), the same on every rank."""
    ep: ExpertParallel = moe.parallel
    ids, weights = moe.router(x, shape, token_ids)
    n, k = ids.shape
    weights = weights.to(x.dtype)
    lo, hi = ep.rows(n)
    owner = ep.owner(ids).flatten()  # [n * k] rank of each (token, slot) pair
    source = torch.bucketize(torch.arange(n, device=x.device), torch.tensor(
        [ep.rows(n, r)[0] for r in range(1, ep.world)], device=x.device), right=True).repeat_interleave(k)
    counts = torch.bincount(source * ep.world + owner, minlength=ep.world**2).view(ep.world, ep.world).tolist()
    send, recv = counts[ep.rank], [counts[s][ep.rank] for s in range(ep.world)]

    # dispatch: this rank's pairs, ordered by owner (stable, so row-major within each owner)
    mine = owner[lo * k:hi * k]
    order = torch.sort(mine, stable=True).indices
    pair = order + lo * k  # global flat (token, slot) index of each row sent
    got = _exchange(x[pair // k], send, recv)
    # received rows, by source rank then row-major: exactly the pairs this rank owns, in flat order
    held = (owner == ep.rank).nonzero().squeeze(1)
    expert = ids.flatten()[held]

    by_expert = torch.sort(expert, stable=True).indices  # this rank's experts run on contiguous blocks
    ends = torch.bincount(expert - ep.owned.start, minlength=len(ep.owned)).cumsum(0).tolist()
    hidden = moe.experts.grouped_hidden(got[by_expert], ends)
    if moe.hp_hidden.active:
        sorted_pairs = held[by_expert]
        hidden = _whole(moe.hp_hidden, sorted_pairs, hidden, n, k, shape, ids).flatten(0, 1)[sorted_pairs]
    out = torch.empty_like(got)
    out[by_expert] = moe.experts.grouped_down(hidden, ends)  # back in the order received

    if moe.hp_expert_out.active:
        outs = _whole(moe.hp_expert_out, held, out, n, k, shape, ids)
        y = (outs[lo:hi] * weights[lo:hi, :, None]).sum(dim=1)
    else:
        back = _exchange(out, recv, send)  # combine: outputs return in the order their inputs were sent
        # add each token's experts in ascending id order, as one process does: the same sums bit for bit
        add = torch.sort(ids.flatten()[pair] + (pair // k) * ep.experts, stable=True).indices
        y = x.new_zeros(hi - lo, x.shape[-1])
        y.index_add_(0, pair[add] // k - lo, (back * weights.flatten()[pair, None])[add])
    if moe.shared is not None:
        s = moe.shared_out(x[lo:hi])
        if moe.hp_shared.active:
            s = moe.hp_shared(_all_gather_rows(s, ep, n).view(*shape, -1)).flatten(0, -2)[lo:hi]
        y = y + s
    return _all_gather_rows(y, ep, n)
