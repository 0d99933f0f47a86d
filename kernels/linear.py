"""Block-scaled FP8 linear for the dense projections of FP8 checkpoints: y = x @ dequant(W).T without a dequantised
copy of W (docs/references.md, "Quantised formats": one multiplier per `block` of a float8_e4m3fn weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.quant import dequant_fp8

from .backend import (cdiv, check_weights, dot_f32, kernel_scale, precision, require, stored, use_triton,
                      weight_format)
from .fused_moe import LaunchConfig, launch_config


def reference_block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                               block: tuple[int, int]) -> torch.Tensor:
    """x [..., in] @ dequant(weight [out, in], scale).T in fp32 math, in x's dtype."""
    return F.linear(x.float(), dequant_fp8(weight, scale, block)).to(x.dtype)


def linear_block_k(config: LaunchConfig, block: tuple[int, int]) -> int:
    """The config's block_k, halved until it divides the scale block's input size (one multiplier per K tile)."""
    block_k = config.block_k
    while block[1] % block_k and block_k > 16:
        block_k //= 2
    return block_k


def triton_block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], *,
                            config: LaunchConfig | None = None) -> torch.Tensor:
    """The Triton kernel behind `block_fp8_linear`: a tiled GEMM that scales each K tile's dot per output column."""
    fmt = weight_format(weight, require("fp8_linear_kernel", x))
    if fmt not in ("fp8", "fp8_bits"):
        raise TypeError(f"block_fp8_linear takes float8_e4m3fn weights, got {weight.dtype}")
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x [..., {x.shape[-1]}] does not fit weight [{n_out}, {n_in}]")
    rows = x.reshape(-1, n_in)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    m = rows.shape[0]
    config = config or launch_config(m, 1, x.dtype)  # the experts' table: rows per weight matrix
    block_k = linear_block_k(config, block)
    check_weights(weight, n_in, fmt, scale, block, block_k)
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n_out)
    s = kernel_scale(scale, fmt, weight)
    from .linear_jit import fp8_linear_kernel

    fp8_linear_kernel[(cdiv(m, config.block_m), cdiv(n_out, config.block_n))](
        rows, stored(weight, fmt), s, y, m, n_out, n_in, rows.stride(0), *weight.stride(), *s.stride(),
        FORMAT=fmt, SCALE_N=block[0], SCALE_K=block[1], DOT_F32=dot_f32(x), PRECISION=precision(x),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y.view(*x.shape[:-1], n_out)


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """x [..., in] @ dequant(weight).T for a float8_e4m3fn weight [out, in] with fp32 (or ue8m0) scales
    [ceil(out / bo), ceil(in / bi)]: the kernel where it runs, in x's dtype."""
    if use_triton(x) and block[1] % 16 == 0:  # a K tile (>= 16) must share one multiplier; published blocks are 128
        return triton_block_fp8_linear(x, weight, scale, block)
    return reference_block_fp8_linear(x, weight, scale, block)
