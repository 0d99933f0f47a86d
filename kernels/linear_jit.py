"""Triton kernel of the block-scaled FP8 linear (launched by linear.py, which holds the reference)."""

import triton
import triton.language as tl

from .quant_jit import weight_dot


@triton.jit
def fp8_linear_kernel(x, w, s, y, m, n_out, n_in, stride_xm, stride_wn, stride_wk, stride_sn, stride_sk,
                      FORMAT: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, DOT_F32: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows pid_m x columns pid_n of y [m, n_out] = x [m, n_in] @ W.T, W the FP8 codes at w times their block scales."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n_out
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        a = tl.load(x + rows[:, None] * stride_xm + (k0 + kk)[None, :],
                    mask=row_ok[:, None] & (k0 + kk < n_in)[None, :], other=0.0)
        acc = weight_dot(acc, a, w, s, cols, col_ok, k0, n_in, stride_wn, stride_wk, stride_sn, stride_sk,
                         FORMAT, SCALE_N, SCALE_K, DOT_F32, PRECISION, BLOCK_K, BLOCK_N)
    tl.store(y + rows[:, None] * n_out + cols[None, :], acc.to(y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
