"""The numba kernels the analyses count with, and the block steps that apply them: `step(start, arrays, acc,
*params)` adds one token block (`arrays`: the scanned variables, then the per-token arrays; first token at
`start`) to the accumulators `acc`, here or in a task on a dask worker."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# router confidence sums entropy and margin in units of 2**-28: exact in int64 under any split of the tokens
# (blocks, tasks), finer than the float32 values they come from, and good for 2**35 / log2(entries) tokens
FIXED_POINT = 1 << 28


@njit(parallel=True, cache=True, nogil=True)
def _count_load(ids, counts, tokens):  # pragma: no cover - compiled
    """counts[l, e] += slots routed to e; tokens[l] += tokens with routing."""
    L, T, K = ids.shape
    for l in prange(L):
        for t in range(T):
            if ids[l, t, 0] >= 0:
                tokens[l] += 1
            for s in range(K):
                e = ids[l, t, s]
                if e >= 0:
                    counts[l, e] += 1


@njit(parallel=True, cache=True, nogil=True)
def _count_pairs(ids, counts, adjacent):  # pragma: no cover - compiled
    """counts[l, i, j] += tokens with i and j both selected (adjacent: at neighbouring ranks), both orders;
    each pair is counted once in rank order and the matrix symmetrised at the end."""
    L, T, K = ids.shape
    E = counts.shape[1]
    for l in prange(L):
        m = np.zeros((E, E), np.int64)
        for t in range(T):
            for s in range(K - 1):
                a = ids[l, t, s]
                if a < 0:
                    continue
                stop = s + 2 if adjacent else K
                for r in range(s + 1, stop):
                    b = ids[l, t, r]
                    if b >= 0:
                        m[a, b] += 1
        for i in range(E):
            for j in range(E):
                counts[l, i, j] += m[i, j] + m[j, i]


@njit(parallel=True, cache=True, nogil=True)
def _count_repeats(ids, codes, out):  # pragma: no cover - compiled
    """Consecutive pairs (t-1, t) of the block with the same label (a block starting one token early pairs its
    first token with the one before). out[g, l] += (pairs, same top-1, top-2 sets intersect, |top-k ∩|)."""
    L, T, K = ids.shape
    for l in prange(L):
        for t in range(1, T):
            c = codes[t]
            a0, p0 = ids[l, t, 0], ids[l, t - 1, 0]
            if a0 < 0 or p0 < 0 or c < 0 or c != codes[t - 1]:
                continue
            out[c, l, 0] += 1
            if a0 == p0:
                out[c, l, 1] += 1
            if K > 1:
                a1, p1 = ids[l, t, 1], ids[l, t - 1, 1]
                if a0 == p0 or a0 == p1 or a1 == p0 or a1 == p1:
                    out[c, l, 2] += 1
            shared = 0
            for s in range(K):
                for r in range(K):
                    if ids[l, t, s] == ids[l, t - 1, r]:
                        shared += 1
            out[c, l, 3] += shared


@njit(parallel=True, cache=True, nogil=True)
def _count_joint(ids, codes, counts, top):  # pragma: no cover - compiled
    """counts[l, c, e] += slots of rank < top routed to e at tokens labelled c (c < 0: skipped)."""
    L, T, K = ids.shape
    for l in prange(L):
        for t in range(T):
            c = codes[t]
            if c < 0:
                continue
            for s in range(top):
                e = ids[l, t, s]
                if e >= 0:
                    counts[l, c, e] += 1


@njit(cache=True, nogil=True)
def _count_cross(ids, pairs, counts, top):  # pragma: no cover - compiled
    """counts[p, i, j] += tokens routed to i (rank < top) in layer pairs[p, 0] and to j in layer pairs[p, 1]."""
    P = pairs.shape[0]
    T = ids.shape[1]
    for p in range(P):
        la, lb = pairs[p, 0], pairs[p, 1]
        for t in range(T):
            for s in range(top):
                a = ids[la, t, s]
                if a < 0:
                    continue
                for r in range(top):
                    b = ids[lb, t, r]
                    if b >= 0:
                        counts[p, a, b] += 1


@njit(cache=True, nogil=True)
def count_overlap(a, b, k, out):  # pragma: no cover - compiled
    """out[l] += (tokens, |A ∩ B| over the first k ranks, same top-1, |A ∩ B| / |A ∪ B|)."""
    L, T, _ = a.shape
    for l in range(L):
        for t in range(T):
            if a[l, t, 0] < 0 or b[l, t, 0] < 0:
                continue
            shared = 0
            for s in range(k):
                for r in range(k):
                    if a[l, t, s] == b[l, t, r]:
                        shared += 1
            out[l, 0] += 1
            out[l, 1] += shared
            out[l, 2] += a[l, t, 0] == b[l, t, 0]
            out[l, 3] += shared / (2 * k - shared)


@njit(cache=True, nogil=True)
def _confidence(values, logits, sums, hist_entropy, hist_margin):  # pragma: no cover - compiled
    """Per token: p = softmax(values) (logits) or values / sum(values); sums[l] += (tokens, entropy bits,
    top-1 minus top-2 p), the last two in units of 1 / FIXED_POINT; histograms of normalised entropy and
    margin over [0, 1]."""
    L, T, N = values.shape
    bins = hist_entropy.shape[1]
    p = np.empty(N)
    for l in range(L):
        for t in range(T):
            v = values[l, t]
            if v[0] != v[0]:
                continue
            hi = -np.inf
            for i in range(N):
                hi = max(hi, v[i])
            total = 0.0
            for i in range(N):
                p[i] = math.exp(v[i] - hi) if logits else max(float(v[i]), 0.0)
                total += p[i]
            if total <= 0:
                continue
            h, first, second = 0.0, 0.0, 0.0
            for i in range(N):
                q = p[i] / total
                if q > 0:
                    h -= q * math.log2(q)
                if q > first:
                    second = first
                    first = q
                elif q > second:
                    second = q
            sums[l, 0] += 1
            sums[l, 1] += int(h * FIXED_POINT + 0.5)
            sums[l, 2] += int((first - second) * FIXED_POINT + 0.5)
            hn = h / math.log2(N) if N > 1 else 0.0
            hist_entropy[l, min(int(hn * bins), bins - 1)] += 1
            hist_margin[l, min(int((first - second) * bins), bins - 1)] += 1


@njit(cache=True, nogil=True)
def _max_abs(ids, out, start, best, where_token, where_dim):  # pragma: no cover - compiled
    """best[l, e] = max |out[l, t, s, :]| over slots routed to e (NaN rows skipped), with its token and dim."""
    L, T, K, H = out.shape
    for l in range(L):
        for t in range(T):
            for s in range(K):
                e = ids[l, t, s]
                if e < 0:
                    continue
                row = out[l, t, s]
                for h in range(H):
                    x = abs(row[h])
                    if x > best[l, e]:
                        best[l, e] = x
                        where_token[l, e] = start + t
                        where_dim[l, e] = h


# ---------------------------------------------------------------- block steps


def load_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray]) -> None:
    """expert_load: routing slots per (layer, expert), tokens per layer."""
    _count_load(arrays[0], *acc)


def coactivation_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], adjacent: bool) -> None:
    """coactivation: pairs per (layer, i, j), then as load_step."""
    _count_pairs(arrays[0], acc[0], adjacent)
    _count_load(arrays[0], acc[1], acc[2])


def joint_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], top: int) -> None:
    """Specialisation and mutual information: slots per (layer, label, expert)."""
    _count_joint(arrays[0], arrays[1], acc[0], top)


def repetition_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray]) -> None:
    """repetition: consecutive pairs per (label, layer)."""
    _count_repeats(arrays[0], arrays[1], acc[0])


def cross_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], pairs: np.ndarray, top: int) -> None:
    """cross_layer: tokens per (layer pair, i, j)."""
    _count_cross(arrays[0], pairs, acc[0], top)


def confidence_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], logits: bool) -> None:
    """router_confidence: sums and histograms per layer."""
    _confidence(arrays[0].astype(np.float32, copy=False), logits, *acc)


def max_abs_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], token0: int) -> None:
    """super_experts: max |experts_out| per (layer, expert) and where (token positions from `token0`)."""
    ids, values = arrays
    _max_abs(ids, values.reshape(*values.shape[:3], -1), token0 + start, *acc)
