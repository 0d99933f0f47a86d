"""The V4 CSA indexer's top-k at depth: t queries against N pooled entries, as one CSA layer of the embedded model
scores them for one chunk in the middle of a 1M-token trace (8,192 queries, 125,000 entries, 2 heads of 32, top-32).

Times, best of --repeat in rounds that run each contender in turn, for bf16 inputs (a bf16 model) and fp32 ones:
`index_topk` (the CPU path: matmul per tile, numba bounds, exact rescoring of the few kept), its matmul alone in
the same dtype (the limit of any tiled path), and the fp32 matmul alone (which bounded the path before it, which
scored in fp32).

    .venv/bin/python bench/indexer.py [--queries 8192] [--entries 125000] [--repeat 3]
"""

from __future__ import annotations

import argparse

import torch
from forward import best_times

from workbench.models import indexer


def matmul_only(q: torch.Tensor, keys_t: torch.Tensor, dtype: torch.dtype) -> None:
    """The tiles' matmuls of `index_topk` alone, in `dtype`."""
    rows_per = max(1, indexer.INDEX_ROWS // q.shape[1])
    q, keys_t = q.to(dtype), keys_t.to(dtype)
    out = torch.empty(rows_per * q.shape[1], indexer.INDEX_TILE, dtype=dtype)
    for i in range(0, q.shape[0], rows_per):
        rows = q[i:i + rows_per].flatten(0, 1)
        for start in range(0, keys_t.shape[1], indexer.INDEX_TILE):
            tile = keys_t[:, start:start + indexer.INDEX_TILE]
            torch.mm(rows, tile, out=out[: rows.shape[0], : tile.shape[1]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=8192)
    ap.add_argument("--entries", type=int, default=125_000)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    t, n = args.queries, args.entries
    w = torch.randn(t, args.heads, generator=g)
    limit = torch.arange(t) // 4 + n - t // 4  # causal: query i sees the entries complete before it
    print(f"{t:,} queries x {n:,} entries, {args.heads} heads of {args.dim}, top-{args.topk}; "
          f"{torch.get_num_threads()} threads")
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        q = torch.randn(t, args.heads, args.dim, generator=g).to(dtype).float()
        keys_t = torch.randn(n, args.dim, generator=g).to(dtype).float().T
        times = best_times({
            "index_topk": lambda: indexer.index_topk(q, w, keys_t, limit, args.topk),
            f"{name} matmul alone": lambda: matmul_only(q, keys_t, dtype),
            "fp32 matmul alone": lambda: matmul_only(q, keys_t, torch.float32),
        }, args.repeat)
        flops = 2 * t * args.heads * args.dim * n
        print(f"{name} inputs: index_topk {times['index_topk']:.3f} s; its {name} matmul alone "
              f"{times[f'{name} matmul alone']:.3f} s ({flops / times[f'{name} matmul alone'] / 1e9:.0f} GFLOP/s), "
              f"{times['index_topk'] / times[f'{name} matmul alone']:.2f}x it; the fp32 matmul alone "
              f"{times['fp32 matmul alone']:.3f} s ({times['index_topk'] / times['fp32 matmul alone']:.2f}x it)")


if __name__ == "__main__":
    main()
