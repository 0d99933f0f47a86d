"""Triton kernel of the fused router (launched by router.py, which holds the reference)."""

import triton
import triton.language as tl


@triton.jit
def pick(values, taken, cols, BLOCK: tl.constexpr):
    """Per row, the column of the highest value not yet taken, the lowest such column on ties."""
    cand = tl.where(taken, float("-inf"), values)
    best = tl.max(cand, axis=1)
    return tl.min(tl.where(~taken & (cand == best[:, None]), cols[None, :], BLOCK), axis=1)


@triton.jit
def route_kernel(logits, bias, ids_out, weights_out, n_rows, stride_row, norm_eps, scaling,
                 E: tl.constexpr, K: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GROUPS: tl.constexpr, KEEP_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr,
                 WEIGHT_SOFTMAX: tl.constexpr, RENORM: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    """Rows [pid * BLOCK_T, +BLOCK_T): scores, biased group-limited top-k, then weights from the unbiased scores."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok, col_ok = rows < n_rows, cols < E
    x = tl.load(logits + rows.to(tl.int64)[:, None] * stride_row + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if SCORE == 0:  # softmax over the experts
        z = tl.where(col_ok[None, :], x, float("-inf"))
        p = tl.exp(z - tl.max(z, axis=1)[:, None])
        s = p / tl.sum(p, axis=1)[:, None]
    elif SCORE == 1:  # sigmoid, without overflow on either side
        t = tl.exp(-tl.abs(x))
        s = tl.where(x >= 0, 1.0 / (1.0 + t), t / (1.0 + t))
    elif SCORE == 2:  # sqrt(softplus(x)); log1p(t) = log(u) * t / (u - 1) with u = 1 + t keeps small t exact
        t = tl.exp(-tl.abs(x))
        u = 1.0 + t
        log1p = tl.where(u == 1.0, t, tl.log(u) * t / (u - 1.0))
        s = tl.sqrt(tl.maximum(x, 0.0) + log1p)
    else:
        s = x
    sel = s
    if HAS_BIAS:
        sel = s + tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    taken = tl.broadcast_to((cols >= E)[None, :], [BLOCK_T, BLOCK_E])  # padding columns are never picked
    if GROUPS > 1:
        group = cols // (E // GROUPS)
        gcols = tl.arange(0, BLOCK_G)
        rank = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for g in tl.static_range(GROUPS):
            in_g = (group == g)[None, :]
            v = tl.where(in_g, sel, float("-inf"))
            top = tl.max(v, axis=1)
            if GROUP_TOP2:
                first = tl.min(tl.where(in_g & (v == top[:, None]), cols[None, :], BLOCK_E), axis=1)
                top += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), v), axis=1)
            rank = tl.where(gcols[None, :] == g, top[:, None], rank)
        kept = tl.broadcast_to((gcols >= GROUPS)[None, :], [BLOCK_T, BLOCK_G])
        for _ in tl.static_range(KEEP_GROUPS):
            kept |= gcols[None, :] == pick(rank, kept, gcols, BLOCK_G)[:, None]
        kept &= (gcols < GROUPS)[None, :]
        allowed = tl.zeros([BLOCK_T, BLOCK_E], tl.int1)
        for g in tl.static_range(GROUPS):
            kept_g = tl.max(tl.where(gcols[None, :] == g, kept.to(tl.int32), 0), axis=1) > 0
            allowed |= (group == g)[None, :] & kept_g[:, None]
        sel = tl.where(allowed, sel, float("-inf"))
    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for j in tl.static_range(K):
        best = pick(sel, taken, cols, BLOCK_E)
        hit = cols[None, :] == best[:, None]
        taken |= hit
        ids = tl.where(kcols[None, :] == j, best[:, None], ids)
        w = tl.where(kcols[None, :] == j, tl.sum(tl.where(hit, s, 0.0), axis=1)[:, None], w)
    k_ok = (kcols < K)[None, :]
    if WEIGHT_SOFTMAX:  # softmax over the k selected (GPT-OSS)
        z = tl.where(k_ok, w, float("-inf"))
        p = tl.exp(z - tl.max(z, axis=1)[:, None])
        w = p / tl.sum(p, axis=1)[:, None]
    elif RENORM:
        w = w / (tl.sum(w, axis=1)[:, None] + norm_eps)
    w = w * scaling
    out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    mask = row_ok[:, None] & k_ok
    tl.store(ids_out + out, ids.to(ids_out.dtype.element_ty), mask=mask)
    tl.store(weights_out + out, w, mask=mask)
