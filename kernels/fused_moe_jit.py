"""Triton kernels of the fused routed experts (launched by fused_moe.py, which holds the references)."""

import triton
import triton.language as tl


@triton.jit
def tile_dot(a, w, acc, s, SCALED: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ w for a [M, K] and w [K, N] tiles; FP8 w is upcast exactly and its scale s [N] applied."""
    if DOT_F32:
        a = a.to(tl.float32)
    w = w.to(a.dtype)
    if SCALED:
        return acc + tl.dot(a, w, input_precision=PRECISION) * s[None, :]
    return tl.dot(a, w, acc, input_precision=PRECISION)


@triton.jit
def gate_up_kernel(x, w_gate, w_up, b_gate, b_up, s_gate, s_up, hidden, pairs, block_expert,
                   top_k, n_pairs, inter, hid, stride_x, stride_we, stride_wn, stride_wk,
                   stride_se, stride_sn, stride_sk, stride_be, limit, alpha,
                   HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, CLAMP: tl.constexpr, GPT_OSS: tl.constexpr,
                   SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Block pid_m of aligned pairs x columns pid_n of I: gate and up GEMMs on gathered rows of x, then SwiGLU."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert + pid_m).to(tl.int64)
    if e >= 0:
        pair = tl.load(pairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = pair < n_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < inter
        kk = tl.arange(0, BLOCK_K)
        a_ptr = x + (pair // top_k)[:, None] * stride_x + kk[None, :]
        w_off = e * stride_we + cols[None, :] * stride_wn + kk[:, None] * stride_wk
        s_off = e * stride_se + (cols // SCALE_N) * stride_sn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hid, BLOCK_K):
            k_ok = k0 + kk < hid
            a = tl.load(a_ptr + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            g = tl.load(w_gate + w_off + k0 * stride_wk, mask=w_mask, other=0.0)
            u = tl.load(w_up + w_off + k0 * stride_wk, mask=w_mask, other=0.0)
            sg = 1.0
            su = 1.0
            if SCALED:
                sg = tl.load(s_gate + s_off + (k0 // SCALE_K) * stride_sk, mask=col_ok, other=0.0)
                su = tl.load(s_up + s_off + (k0 // SCALE_K) * stride_sk, mask=col_ok, other=0.0)
            acc_g = tile_dot(a, g, acc_g, sg, SCALED, DOT_F32, PRECISION)
            acc_u = tile_dot(a, u, acc_u, su, SCALED, DOT_F32, PRECISION)
        if HAS_BIAS:
            acc_g += tl.load(b_gate + e * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_up + e * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if CLAMP:
            acc_g = tl.minimum(acc_g, limit)
            acc_u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        if GPT_OSS:
            h = (acc_u + 1.0) * acc_g * tl.sigmoid(acc_g * alpha)
        else:
            h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(hidden + pair[:, None] * inter + cols[None, :], h.to(hidden.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(hidden, w_down, b_down, s_down, weights, out, pairs, block_expert, n_pairs, hid, inter,
                stride_h, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_be,
                HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, WEIGHTED: tl.constexpr,
                SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Block pid_m of aligned pairs x columns pid_n of H: the down GEMM on their hidden rows, bias, weight."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert + pid_m).to(tl.int64)
    if e >= 0:
        pair = tl.load(pairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = pair < n_pairs
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < hid
        kk = tl.arange(0, BLOCK_K)
        a_ptr = hidden + pair[:, None] * stride_h + kk[None, :]
        w_off = e * stride_we + cols[None, :] * stride_wn + kk[:, None] * stride_wk
        s_off = e * stride_se + (cols // SCALE_N) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k_ok = k0 + kk < inter
            a = tl.load(a_ptr + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_down + w_off + k0 * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            s = 1.0
            if SCALED:
                s = tl.load(s_down + s_off + (k0 // SCALE_K) * stride_sk, mask=col_ok, other=0.0)
            acc = tile_dot(a, w, acc, s, SCALED, DOT_F32, PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_down + e * stride_be + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if WEIGHTED:
            acc *= tl.load(weights + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out + pair[:, None] * hid + cols[None, :], acc.to(out.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def sum_kernel(out, weights, y, n, hid, K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """y[t] = sum_j out[t, j] (* weights[t, j]) in fp32, j in slot order, for a tile of tokens and columns."""
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (tok < n)[:, None] & (cols < hid)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        v = tl.load(out + (tok * K + j)[:, None] * hid + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            v *= tl.load(weights + tok * K + j, mask=tok < n, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(y + tok[:, None] * hid + cols[None, :], acc.to(y.dtype.element_ty), mask=mask)
