"""The grouped backend's CPU bf16 path: expert blocks padded to a few recurring row counts (`pad_blocks`) give
the reference loop's results bit for bit."""

import pytest
import torch

import workbench as wb
from workbench.demo import EMBEDDED_MODEL
from workbench.models.moe import expert_blocks, pad_blocks, padded_size


def test_padded_sizes_are_powers_of_two_up_to_half_the_bucket_then_multiples_of_it():
    assert [padded_size(n, 64) for n in (0, 1, 2, 3, 5, 17, 32, 33, 64, 65, 200)] == \
        [0, 1, 2, 4, 8, 32, 32, 64, 64, 128, 256]


def test_pad_blocks_puts_each_expert_block_at_its_padded_size():
    experts = torch.tensor([0, 0, 0, 2, 3, 3, 3, 3, 3])  # sorted; expert 1 has no rows
    ends = torch.bincount(experts, minlength=4).cumsum(0).tolist()
    rows = torch.arange(1, 10, dtype=torch.bfloat16)[:, None].expand(-1, 3)
    padded, padded_ends, where = pad_blocks(rows, experts, ends, 4)
    assert padded_ends == [4, 4, 5, 13]  # 3 rows -> a bucket (more than half of it), 1 -> 1, 5 -> two buckets
    assert where.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert torch.equal(padded[where], rows)
    assert padded.sum() == rows.sum()  # the rest is zeros
    assert [(e, b.start, b.stop) for e, b in expert_blocks(padded_ends)] == [(0, 0, 4), (2, 4, 5), (3, 5, 13)]


@pytest.mark.parametrize("shape", [(2, 300), (1, 8)])  # long blocks; a short prompt's one- to few-row blocks
def test_grouped_bf16_equals_the_reference_loop_bit_for_bit(shape):
    """On the embedded (bf16) model, the grouped backend with padded blocks and the torch loop agree exactly, in
    every layer's MoE output and in the logits, also when experts.out is recorded (the unpadded hooked path)."""
    ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0))
    names = ["layers.*.moe.out"]
    grouped, loop = (wb.load(EMBEDDED_MODEL, backend=b) for b in ("grouped", "torch"))
    assert next(grouped.parameters()).dtype == torch.bfloat16
    logits, cache = grouped.run_with_cache(ids, names=names)
    want_logits, want = loop.run_with_cache(ids, names=names)
    assert torch.equal(logits, want_logits)
    assert all(torch.equal(cache[n], want[n]) for n in want) and len(want) == 6
    hooked, _ = grouped.run_with_cache(ids, names=["layers.*.experts.out"])
    assert torch.equal(hooked, want_logits)
