"""Triton kernels of the token-to-expert alignment (launched by align.py, which holds the reference)."""

import triton
import triton.language as tl


@triton.jit
def count_kernel(ids, counts, n, BLOCK: tl.constexpr):
    """Program e: how many of the n pairs chose expert e."""
    e = tl.program_id(0)
    total = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += (tl.load(ids + offs, mask=offs < n, other=-1) == e).to(tl.int32)
    tl.store(counts + e, tl.sum(total, axis=0))


@triton.jit
def place_kernel(ids, counts, pairs, block_expert, padded, n, experts, max_blocks, BLOCK_M: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program e: write expert e's pair ids at its padded start, its padding and its blocks' expert; the last
    program also fills the unused tail and the used length."""
    e = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    blocks = (tl.load(counts + ecols, mask=ecols < experts, other=0) + BLOCK_M - 1) // BLOCK_M
    first_block = tl.sum(tl.where(ecols < e, blocks, 0), axis=0)
    own_blocks = tl.sum(tl.where(ecols == e, blocks, 0), axis=0)
    start = first_block * BLOCK_M
    placed = 0
    for s in range(0, n, BLOCK):  # stable: pairs of this expert in index order
        offs = s + tl.arange(0, BLOCK)
        mine = (tl.load(ids + offs, mask=offs < n, other=-1) == e).to(tl.int32)
        slot = start + placed + tl.cumsum(mine, axis=0) - 1
        tl.store(pairs + slot, offs, mask=mine > 0)
        placed += tl.sum(mine, axis=0)
    rows = tl.arange(0, BLOCK_M)
    tail = start + placed + rows  # the padding of this expert's last block
    tl.store(pairs + tail, tl.full([BLOCK_M], 0, tl.int32) + n, mask=tail < start + own_blocks * BLOCK_M)
    for b in range(0, own_blocks, BLOCK):
        offs = b + tl.arange(0, BLOCK)
        tl.store(block_expert + first_block + offs, tl.full([BLOCK], 0, tl.int32) + e, mask=offs < own_blocks)
    if e == experts - 1:  # the unused tail of both buffers, and the used length
        used = first_block + own_blocks
        tl.store(padded, used * BLOCK_M)
        for b in range(used, max_blocks, BLOCK):
            offs = b + tl.arange(0, BLOCK)
            tl.store(block_expert + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < max_blocks)
        for r in range(used * BLOCK_M, max_blocks * BLOCK_M, BLOCK):
            offs = r + tl.arange(0, BLOCK)
            tl.store(pairs + offs, tl.full([BLOCK], 0, tl.int32) + n, mask=offs < max_blocks * BLOCK_M)
