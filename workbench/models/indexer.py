"""Top-k of the sparse-attention indexers (DeepSeek-V3.2's lightning indexer, V4's CSA indexer): each query's k
best-scored entries, deterministic at any chunking, in bounded memory (on CPU a fused numba scan per tile)."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..parallel import torch_threads


def topk_entries(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k highest scores, best first, ties to the lower index; -1 where the pick is -inf.

    Deterministic whatever the number of rows or columns (so chunked and whole-sequence runs agree): one
    top-k pass, plus a stable re-pick only for the rows where the k-th score ties with one left out.
    """
    if scores.shape[-1] < k:
        scores = F.pad(scores, (0, k - scores.shape[-1]), value=float("-inf"))
    value, picked = scores.topk(k, dim=-1)
    threshold = value[..., -1:]
    ambiguous = (torch.isfinite(threshold) & ((scores >= threshold).sum(-1, keepdim=True) > k)).squeeze(-1)
    if ambiguous.any():
        rows = scores[ambiguous]
        above, tie = rows > threshold[ambiguous], rows == threshold[ambiguous]
        take = above | (tie & (tie.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
        index = torch.arange(rows.shape[-1], device=rows.device).expand_as(rows)
        picked[ambiguous] = torch.where(take, index, rows.shape[-1]).topk(k, dim=-1, largest=False).values
    picked = picked.sort(dim=-1).values  # best first, equal scores by index: a stable sort on index order
    value = scores.gather(-1, picked)
    order = torch.sort(value, dim=-1, descending=True, stable=True).indices
    return picked.gather(-1, order).masked_fill(value.gather(-1, order) == float("-inf"), -1)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer scores [t, N] (fp32): entry s scores sum_h w[t, h] * ReLU(q[t, h] . keys_t[:, s]) for
    s < limit[t], -inf beyond. q [t, H, D], w [t, H] and keys_t [D, N] are fp32."""
    t, heads, n = q.shape[0], q.shape[1], keys_t.shape[1]
    per_head = (q.flatten(0, 1) @ keys_t).view(t, heads, n).relu_()
    scores = per_head[:, 0] * w[:, :1]
    for h in range(1, heads):
        scores += per_head[:, h] * w[:, h, None]
    lo = int(limit.min())  # entries below lo are visible to every query
    scores[:, lo:].masked_fill_(torch.arange(lo, n, device=q.device)[None] >= limit[:, None], float("-inf"))
    return scores


INDEX_ROWS, INDEX_TILE = 1024, 2048  # (query, head) rows x entries scored at once: 8 MiB of dot products


def index_topk(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, limit: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries [t, k] with the highest `index_scores` (best first, ties to the lower index, -1 padded),
    in bounded memory at any N. On CPU, tile by tile: a matmul for a few queries' dot products with a tile of
    entries, then one fused pass (numba) that scores the tile and keeps a running top-k per query, so no
    [t, N] score map is written and read back. Elsewhere, `topk_entries` of `index_scores` a few queries
    at a time. Both give the same picks bit for bit."""
    q, w, keys_t = q.detach(), w.detach(), keys_t.detach()  # picks are indices: no gradient flows through them
    t, heads, n = q.shape[0], q.shape[1], keys_t.shape[1]
    queries = max(1, INDEX_ROWS // heads)
    if q.device.type != "cpu":
        queries = max(queries, (INDEX_ROWS * INDEX_TILE) // max(1, heads * n))
        return torch.cat([topk_entries(index_scores(q[i:i + queries], w[i:i + queries], keys_t, limit[i:i + queries]), k)
                          for i in range(0, t, queries)]) if t else q.new_empty(0, k, dtype=torch.long)
    scan = _index_topk_kernel()
    value = np.full((t, k), -np.inf, dtype=np.float32)
    index = np.full((t, k), -1, dtype=np.int64)
    dots = torch.empty(queries * heads, min(n, INDEX_TILE))
    limit_np, w_np = limit.numpy(), w.contiguous().numpy()
    for i in range(0, t, queries):
        rows = q[i:i + queries].flatten(0, 1)
        for start in range(0, min(n, int(limit[i:i + queries].max())), INDEX_TILE):
            tile = keys_t[:, start:start + INDEX_TILE]
            out = dots[: rows.shape[0], : tile.shape[1]]
            torch.mm(rows, tile, out=out)
            with torch_threads():
                scan(out.numpy().reshape(-1, heads, tile.shape[1]), w_np[i:i + queries], limit_np[i:i + queries],
                     start, value[i:i + queries], index[i:i + queries])
    _sort_picks(value, index)
    return torch.from_numpy(index)


@functools.cache
def _index_topk_kernel():
    import numba  # only the V4 indexer on CPU needs it: imported on first use

    @numba.njit(parallel=True, nogil=True, cache=True)
    def scan(dots, w, limit, start, value, index):  # pragma: no cover - compiled
        """Fold entries start.. (dots [t, H, n]: one tile's dot products) into each query's running top-k."""
        t, heads, n = dots.shape
        k = value.shape[1]
        for i in numba.prange(t):
            val, idx = value[i], index[i]
            worst = 0  # slot of the lowest (value, then highest index): the one a better entry replaces
            for j in range(k):
                if val[j] < val[worst] or (val[j] == val[worst] and idx[j] > idx[worst]):
                    worst = j
            score = np.empty(256, dtype=np.float32)
            m = min(limit[i] - start, n)
            for s0 in range(0, m, 256):  # score a strip (vectorised), then scan it only if it beats the worst kept
                size = min(256, m - s0)
                for h in range(heads):
                    dot, wh = dots[i, h, s0:s0 + size], w[i, h]
                    if h == 0:
                        for s in range(size):
                            score[s] = max(dot[s], np.float32(0)) * wh
                    else:
                        for s in range(size):
                            score[s] += max(dot[s], np.float32(0)) * wh
                threshold, hit = val[worst], idx[worst] < 0
                for s in range(size):  # an OR over the strip vectorises where a scan with replacements cannot
                    hit |= score[s] > threshold
                if not hit:
                    continue
                for s in range(size):
                    if score[s] > val[worst] or idx[worst] < 0:
                        val[worst], idx[worst] = score[s], start + s0 + s
                        for j in range(k):  # entries come in index order: among equal values the later is worst
                            if val[j] < val[worst] or (val[j] == val[worst] and idx[j] > idx[worst]):
                                worst = j

    return scan


def _sort_picks(value: np.ndarray, index: np.ndarray) -> None:
    """Sort each row's picks best first, equal values by index, empty slots (-1) last; in place."""
    key = np.where(index < 0, np.inf, -value.astype(np.float64))
    order = np.lexsort((index, key), axis=-1)
    value[:] = np.take_along_axis(value, order, -1)
    index[:] = np.take_along_axis(index, order, -1)
