"""Token-to-expert alignment: (token, slot) pairs grouped by expert, each expert's run padded to whole blocks.

Pair p = token * k + slot. Within an expert the pairs keep row-major order (stable), so results are
deterministic. Buffers have a fixed worst-case size computed on the host, so no device-to-host sync is needed:
blocks past the last used one map to expert -1 and the grouped GEMMs skip them. Two kernel launches replace
the reference's sort, bincount, cumsums and scatters (about ten launches and a sync), which dominate at decode
sizes; each program scans all N * k ids, cheap next to the expert GEMMs at any size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .backend import next_pow2, require, use_triton


class Alignment(NamedTuple):
    """Pairs sorted by expert and padded to multiples of `block_m`, with the expert of each block."""

    pairs: torch.Tensor  # [max_blocks * block_m] int32 pair ids; padding holds the sentinel N * k
    block_expert: torch.Tensor  # [max_blocks] int32 expert of each block; -1 past the last used block
    padded: torch.Tensor  # [1] int32: the used length (used blocks * block_m)
    block_m: int


def max_blocks(pairs: int, experts: int, block_m: int) -> int:
    """Worst-case block count: every non-empty expert (at most min(E, pairs)) wastes up to block_m - 1 rows."""
    return (pairs + min(experts, pairs) * (block_m - 1)) // block_m


def reference_align(ids: torch.Tensor, experts: int, block_m: int) -> Alignment:
    """`align` in plain PyTorch: a stable sort by expert, then each expert's run shifted to its padded start."""
    flat = ids.flatten().long()
    n, device = flat.numel(), flat.device
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=experts)
    blocks = (counts + block_m - 1) // block_m
    start = (torch.cumsum(blocks, 0) - blocks) * block_m  # padded start of each expert's run
    first = torch.cumsum(counts, 0) - counts  # unpadded start of each expert's run in `order`
    expert = flat[order]
    nb = max_blocks(n, experts, block_m)
    pairs = torch.full((nb * block_m,), n, dtype=torch.int32, device=device)
    pairs[start[expert] + torch.arange(n, device=device) - first[expert]] = order.int()
    used = torch.repeat_interleave(torch.arange(experts, device=device), blocks)
    block_expert = torch.full((nb,), -1, dtype=torch.int32, device=device)
    block_expert[: used.numel()] = used.int()
    return Alignment(pairs, block_expert, (blocks.sum() * block_m).view(1).int(), block_m)


def triton_align(ids: torch.Tensor, experts: int, block_m: int) -> Alignment:
    """The Triton kernels behind `align`: one program per expert counts, then places, its pairs."""
    require("count_kernel / place_kernel", ids)
    flat = ids.contiguous().view(-1)
    n, device = flat.numel(), flat.device
    nb = max_blocks(n, experts, block_m)
    pairs = torch.empty(nb * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(nb, dtype=torch.int32, device=device)
    padded = torch.zeros(1, dtype=torch.int32, device=device)
    if n == 0:
        return Alignment(pairs, block_expert, padded, block_m)
    counts = torch.empty(experts, dtype=torch.int32, device=device)
    block = min(4096, max(16, next_pow2(n)))
    from .align_jit import count_kernel, place_kernel

    count_kernel[(experts,)](flat, counts, n, BLOCK=block, num_warps=4)
    place_kernel[(experts,)](flat, counts, pairs, block_expert, padded, n, experts, nb, BLOCK_M=block_m,
                             BLOCK=block, BLOCK_E=next_pow2(experts), num_warps=4)
    return Alignment(pairs, block_expert, padded, block_m)


def align(ids: torch.Tensor, experts: int, block_m: int) -> Alignment:
    """Sort the pairs of ids [N, k] by expert, padding each expert's run to a multiple of block_m."""
    return triton_align(ids, experts, block_m) if use_triton(ids) else reference_align(ids, experts, block_m)
