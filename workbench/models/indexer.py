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
    s < limit[t], -inf beyond. q [t, H, D], w [t, H] and keys_t [D, N] are fp32. Each dot product is summed in
    float64 and rounded once to fp32: exact for bf16 inputs, so no tiling, device or kernel changes a score."""
    t, heads, n = q.shape[0], q.shape[1], keys_t.shape[1]
    per_head = (q.flatten(0, 1).double() @ keys_t.double()).float().view(t, heads, n).relu_()
    scores = per_head[:, 0] * w[:, :1]
    for h in range(1, heads):
        scores += per_head[:, h] * w[:, h, None]
    lo = int(limit.min())  # entries below lo are visible to every query
    scores[:, lo:].masked_fill_(torch.arange(lo, n, device=q.device)[None] >= limit[:, None], float("-inf"))
    return scores


INDEX_ROWS, INDEX_TILE = 1024, 2048  # (query, head) rows x entries scored at once
# The CPU path's matmul gives each dot within ROUNDING[dtype] |dot| + dim (ACCUMULATION |q| |k| + DENORMAL) of
# the exact one (docs/architecture.md, "Indexer"): its output's rounding (bf16's unit roundoff doubled), fp32
# accumulation, products flushed to zero. SUMS per head covers the fp32 rounding of the bounds and of the score.
ROUNDING = {torch.bfloat16: 2.0**-7, torch.float32: 0.0}
ACCUMULATION, DENORMAL, SUMS = 2.0**-24, 2.0**-126, 2.0**-22


def index_topk(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, limit: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries [t, k] with the highest `index_scores` (best first, ties to the lower index, -1 padded),
    in bounded memory at any N.

    On CPU, a few queries against a tile of entries at a time: a matmul gives the dot products to within a
    proven bound (in bf16 where q and the keys are bf16 values, as in a bf16 model: about 4x fp32's rate); a
    fused pass (numba) turns them into lower and upper bounds on each score and keeps every entry whose upper
    bound beats the k-th best lower bound so far; the few kept are then scored exactly. Elsewhere,
    `topk_entries` of `index_scores`. Both pick the same, bit for bit; queries whose bounds tie too often (many
    equal scores) are scored exactly."""
    q, w, keys_t = q.detach(), w.detach(), keys_t.detach()  # picks are indices: no gradient flows through them
    t, heads, dim, n = q.shape[0], q.shape[1], q.shape[2], keys_t.shape[1]
    if q.device.type != "cpu" or not t:
        return _index_topk_exact(q, w, keys_t, limit, k)
    scan, pick = _index_topk_kernels()
    q_bf, keys_bf = q.bfloat16(), keys_t.bfloat16()
    if torch.equal(q_bf.float(), q) and torch.equal(keys_bf.float(), keys_t):
        q_mm, keys_mm, dtype = q_bf, keys_bf, torch.bfloat16
    else:
        q_mm, keys_mm, dtype = q, keys_t, torch.float32
    q_norm = torch.linalg.vector_norm(q, dim=-1).numpy()
    key_norm = torch.linalg.vector_norm(keys_t, dim=0)  # each tile's largest, once for every query block:
    tile_max = F.pad(key_norm, (0, -n % INDEX_TILE)).view(-1, INDEX_TILE).amax(1).tolist()
    rounding = ROUNDING[dtype] + (heads + 2) * SUMS
    keys = keys_t.T.contiguous().numpy()
    limit_np, w_np, q_np = limit.numpy(), w.contiguous().numpy(), q.contiguous().numpy()

    queries = max(1, INDEX_ROWS // heads)
    capacity = max(8 * k, 64)  # kept entries per query, between compactions
    value = np.full((t, k), -np.inf, dtype=np.float32)
    index = np.full((t, k), -1, dtype=np.int64)
    overflow = np.zeros(t, dtype=np.bool_)
    dots = torch.empty(queries * heads, min(n, INDEX_TILE), dtype=dtype)
    for i in range(0, t, queries):
        j = min(t, i + queries)
        lower = np.full((j - i, k), -np.inf, dtype=np.float32)
        kept = np.empty((j - i, capacity), dtype=np.int64)
        kept_upper = np.empty((j - i, capacity), dtype=np.float32)
        count = np.zeros(j - i, dtype=np.int64)
        rows = q_mm[i:j].flatten(0, 1)
        with torch_threads():
            for start in range(0, min(n, int(limit[i:j].max())), INDEX_TILE):
                tile = keys_mm[:, start:start + INDEX_TILE]
                out = dots[: rows.shape[0], : tile.shape[1]]
                torch.mm(rows, tile, out=out)
                bits = out.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else out.numpy()
                shift = 4 * dim * (ACCUMULATION * q_norm[i:j] * tile_max[start // INDEX_TILE] + DENORMAL)
                scan(bits.reshape(j - i, heads, -1), w_np[i:j], shift.astype(np.float32), rounding, limit_np[i:j],
                     start, lower, kept, kept_upper, count, overflow[i:j])
            pick(q_np[i:j], w_np[i:j], keys, kept, kept_upper, count, lower, value[i:j], index[i:j])
    _sort_picks(value, index)
    picks = torch.from_numpy(index)
    if overflow.any():
        rows = torch.from_numpy(overflow)
        picks[rows] = _index_topk_exact(q[rows], w[rows], keys_t, limit[rows], k)
    return picks


def _index_topk_exact(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, limit: torch.Tensor,
                      k: int) -> torch.Tensor:
    """`topk_entries` of `index_scores`, a few queries at a time (at most about INDEX_ROWS x INDEX_TILE scores)."""
    t, heads, n = q.shape[0], q.shape[1], keys_t.shape[1]
    queries = max(1, INDEX_ROWS // heads, (INDEX_ROWS * INDEX_TILE) // max(1, heads * n))
    if not t:
        return q.new_empty(0, k, dtype=torch.long)
    return torch.cat([topk_entries(index_scores(q[i:i + queries], w[i:i + queries], keys_t, limit[i:i + queries]), k)
                      for i in range(0, t, queries)])


@functools.cache
def _index_topk_kernels():
    import numba  # only the V4 indexer on CPU needs it: imported on first use
    import numba.extending
    from llvmlite import ir

    from .stream_jit import wide_vectors  # the bounds' strips on the CPU's widest vectors

    @numba.extending.intrinsic
    def as_float(typingctx, x):
        """x as float32: a float32 itself, or the value a bf16's bits (uint16) stand for (shifted to the top)."""
        if x == numba.types.float32:
            return numba.types.float32(x), lambda context, builder, signature, args: args[0]

        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
        return numba.types.float32(numba.types.uint16), codegen

    @numba.njit(parallel=True, nogil=True, cache=True)
    def scan(dots, w, shift, rounding, limit, start, lower, kept, kept_upper, count, overflow):  # pragma: no cover
        """Fold entries start.. (dots [t, H, n]: a tile's dot products, fp32 or bf16 bits, each within
        rounding |dot| + shift [t, H] / 4 of the exact one) into each query's k best lower bounds, and keep every
        entry whose upper bound beats the k-th of them (all of lower indices: an entry that only ties it is
        never picked)."""
        t, heads, n = dots.shape
        k, capacity = lower.shape[1], kept.shape[1]
        for i in numba.prange(t):
            wide_vectors()
            low = lower[i]
            worst = 0  # slot of the lowest lower bound: the k-th best so far
            for j in range(k):
                if low[j] < low[worst]:
                    worst = j
            # head h's true ReLU lies between (1 -/+ rounding) ReLU(dot -/+ shift) (shift: 4x the absolute part
            # of the bound, where the proof needs a little over 1x): a surely negative dot gives an exact 0; a
            # negative weight swaps the two.
            up_w, up_shift = np.empty(heads, dtype=np.float32), np.empty(heads, dtype=np.float32)
            low_w, low_shift = np.empty(heads, dtype=np.float32), np.empty(heads, dtype=np.float32)
            for h in range(heads):
                big, small = w[i, h] * (1 + rounding), w[i, h] * (1 - rounding)
                up_w[h], up_shift[h] = (big, shift[i, h]) if w[i, h] > 0 else (small, -shift[i, h])
                low_w[h], low_shift[h] = (small, -shift[i, h]) if w[i, h] > 0 else (big, shift[i, h])
            upper = np.empty(256, dtype=np.float32)
            m = min(limit[i] - start, n)
            for s0 in range(0, m, 256):  # bound a strip (vectorised), then scan it only if it can beat the k-th
                size = min(256, m - s0)
                for h in range(heads):
                    dot, wh, sh = dots[i, h, s0:s0 + size], up_w[h], up_shift[h]
                    if h == 0:
                        for s in range(size):
                            upper[s] = max(as_float(dot[s]) + sh, np.float32(0)) * wh
                    else:
                        for s in range(size):
                            upper[s] += max(as_float(dot[s]) + sh, np.float32(0)) * wh
                threshold, hit = low[worst], False
                for s in range(size):  # an OR over the strip vectorises where a scan with replacements cannot
                    hit |= upper[s] > threshold
                if not hit:
                    continue
                for s in range(size):
                    if upper[s] > low[worst]:
                        if count[i] == capacity:  # drop the kept that k earlier lower bounds now beat
                            c = 0
                            for j in range(capacity):
                                if kept_upper[i, j] >= low[worst]:
                                    kept[i, c], kept_upper[i, c] = kept[i, j], kept_upper[i, j]
                                    c += 1
                            count[i] = c
                            if c > capacity // 2:
                                overflow[i] = True
                                break
                        kept[i, count[i]], kept_upper[i, count[i]] = start + s0 + s, upper[s]
                        count[i] += 1
                        below = np.float32(0)
                        for h in range(heads):
                            below += max(as_float(dots[i, h, s0 + s]) + low_shift[h], np.float32(0)) * low_w[h]
                        if below > low[worst]:
                            low[worst] = below
                            for j in range(k):
                                if low[j] < low[worst]:
                                    worst = j
                if overflow[i]:
                    break

    @numba.njit(parallel=True, nogil=True, cache=True)
    def pick(q, w, keys, kept, kept_upper, count, lower, value, index):  # pragma: no cover - compiled
        """Score each query's kept entries exactly (float64 dots rounded to fp32, as `index_scores`) and keep
        the k best, ties to the lower index."""
        t, heads, dim = q.shape
        k = value.shape[1]
        for i in numba.prange(t):
            threshold = lower[i].min()
            val, idx = value[i], index[i]
            worst = 0
            for c in range(count[i]):
                if kept_upper[i, c] < threshold:  # k entries score at least threshold: it cannot be picked
                    continue
                e = kept[i, c]
                score = np.float32(0)
                for h in range(heads):
                    total = 0.0
                    for d in range(dim):
                        total += np.float64(q[i, h, d]) * np.float64(keys[e, d])
                    part = max(np.float32(total), np.float32(0)) * w[i, h]
                    score = part if h == 0 else score + part
                if score > val[worst] or idx[worst] < 0:
                    val[worst], idx[worst] = score, e
                    for j in range(k):  # kept entries come in index order: among equal values the later is worst
                        if val[j] < val[worst] or (val[j] == val[worst] and idx[j] > idx[worst]):
                            worst = j

    return scan, pick


def _sort_picks(value: np.ndarray, index: np.ndarray) -> None:
    """Sort each row's picks best first, equal values by index, empty slots (-1) last; in place."""
    key = np.where(index < 0, np.inf, -value.astype(np.float64))
    order = np.lexsort((index, key), axis=-1)
    value[:] = np.take_along_axis(value, order, -1)
    index[:] = np.take_along_axis(index, order, -1)
