"""Process groups and collectives for expert and tensor parallelism over torch.distributed.

Launch with torchrun (`torchrun --nproc-per-node N -m workbench trace ...`, or a script calling `init()` then
`wb.load`). Every rank runs the same program on the same tokens. Under expert parallelism each rank holds a
contiguous range of every MoE layer's routed experts (`ExpertParallel`) and everything else (embeddings,
attention, norms, routers, shared experts) replicated; the MoE block (`workbench.models.moe`) dispatches and
combines its rows with the collectives below. The hooks registered must be the same on every rank (a torchrun
script registers them alike): each forward checks this, and that the token ids agree, with one small all-gather,
and raises HookError otherwise.

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

from .errors import CheckpointError, HookError, InputError, StoreError

# the error another rank's failure is raised as here, by that failure's type name
_OTHER_RANK = {"CheckpointError": CheckpointError, "InputError": InputError, "HookError": HookError,
               "UnknownHookError": HookError, "StoreError": StoreError, "ValueError": ValueError,
               "FileNotFoundError": FileNotFoundError}

if TYPE_CHECKING:
    from .hooks import HookRegistry


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


def all_gather_rows(rows: torch.Tensor, ep: ExpertParallel, n: int) -> torch.Tensor:
    """Every rank's share of `n` rows (this rank's is `rows`), concatenated in rank order: [n, ...]."""
    size = -(-n // ep.world)
    padded = rows.new_zeros(size, *rows.shape[1:])
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(ep.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, (ep.rows(n, r) for r in range(ep.world)))])


def all_to_all_rows(rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    """One all-to-all: `send[r]` consecutive rows go to rank r; returns the rows received, by source rank."""
    out = rows.new_empty(sum(recv), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), recv, send)
    return out


def all_reduce_rows(rows: torch.Tensor, at: torch.Tensor, n: int) -> torch.Tensor:
    """The [n, ...] tensor every rank fills at its indices `at` with its `rows`, summed over ranks (each index
    filled by exactly one rank, so the sum assembles the whole)."""
    full = rows.new_zeros(n, *rows.shape[1:])
    full[at] = rows
    dist.all_reduce(full)
    return full
