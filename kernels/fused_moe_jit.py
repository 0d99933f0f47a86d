"""Triton kernels of the fused routed experts (launched by fused_moe.py, which holds the references)."""

import triton
import triton.language as tl

from .quant_jit import weight_dot


@triton.jit
def gate_up_kernel(x, w_gate, w_up, b_gate, b_up, s_gate, s_up, hidden, pairs, block_expert,
                   top_k, n_pairs, inter, hid, stride_x, stride_we, stride_wn, stride_wk,
                   stride_se, stride_sn, stride_sk, stride_be, limit, alpha,
                   HAS_BIAS: tl.constexpr, FORMAT: tl.constexpr, CLAMP: tl.constexpr, GPT_OSS: tl.constexpr,
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
        wg, wu = w_gate + e * stride_we, w_up + e * stride_we
        sg, su = s_gate + e * stride_se, s_up + e * stride_se
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hid, BLOCK_K):
            a = tl.load(a_ptr + k0, mask=row_ok[:, None] & (k0 + kk < hid)[None, :], other=0.0)
            acc_g = weight_dot(acc_g, a, wg, sg, cols, col_ok, k0, hid, stride_wn, stride_wk, stride_sn, stride_sk,
                               FORMAT, SCALE_N, SCALE_K, DOT_F32, PRECISION, BLOCK_K, BLOCK_N)
            acc_u = weight_dot(acc_u, a, wu, su, cols, col_ok, k0, hid, stride_wn, stride_wk, stride_sn, stride_sk,
                               FORMAT, SCALE_N, SCALE_K, DOT_F32, PRECISION, BLOCK_K, BLOCK_N)
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
                HAS_BIAS: tl.constexpr, FORMAT: tl.constexpr, WEIGHTED: tl.constexpr,
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
        w, s = w_down + e * stride_we, s_down + e * stride_se
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            a = tl.load(a_ptr + k0, mask=row_ok[:, None] & (k0 + kk < inter)[None, :], other=0.0)
            acc = weight_dot(acc, a, w, s, cols, col_ok, k0, inter, stride_wn, stride_wk, stride_sn, stride_sk,
                             FORMAT, SCALE_N, SCALE_K, DOT_F32, PRECISION, BLOCK_K, BLOCK_N)
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
