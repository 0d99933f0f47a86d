"""Fused routed experts: grouped GEMMs over the aligned pairs, SwiGLU in the epilogue, a slot-ordered top-k sum.

Semantics are those of `workbench.models.moe.Experts` / `MoE.routed` with a SiLU gate: `limit` clamps gate
above and up both sides (DeepSeek-V4, GPT-OSS), `alpha` selects GPT-OSS's (up + 1) * gate * sigmoid(alpha * gate).
Weights are stacked [E, I, H] (gate, up; or gate and up fused [E, 2I, H], gate rows first) and [E, H, I] (down),
in a float dtype, as FP8 e4m3 with one fp32 (or ue8m0) multiplier per `block` (workbench.quant layout), or as FP4:
uint8 pairs of e2m1 codes [E, out, in / 2] (low nibble = even input) with one e8m0 exponent byte per 32 inputs
of a row [E, out, in / 32], the layout of DeepSeek-V4's experts and GPT-OSS's MXFP4 (docs/references.md,
"Quantised formats"). The weight dtype says which.

Per-pair tensors are indexed by pair id p = token * k + slot, so [N * k, *] buffers are token-major [N, k, *]
as they are: hooks get `experts.hidden` / `experts.out` without a permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from workbench.quant import dequant_fp4, dequant_fp8

from .align import Alignment, align
from .backend import (cdiv, check_weights, dot_f32, kernel_scale, next_pow2, precision, require, stored, use_triton,
                      weight_format)

GateUp = tuple[torch.Tensor | None, torch.Tensor | None]  # (gate, up) biases or scales


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of the grouped GEMMs; block_m is also the alignment's block."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Pairs per expert (N * k / E) up to this -> config, for 16-bit activations (fp32 halves block_k to fit shared
# memory). Decode-sized batches use short blocks so padding wastes little; block_k divides the FP8 block (128)
# and is a multiple of the FP4 scale group (32). tests/test_aot.py compiles every entry for sm_80, sm_90 and
# sm_100 in every activation dtype and weight format (untuned on a GPU).
CONFIGS: tuple[tuple[float, LaunchConfig], ...] = (
    (16, LaunchConfig(16, 64, 128, 4, 4)),
    (64, LaunchConfig(32, 64, 128, 4, 4)),
    (256, LaunchConfig(64, 128, 64, 8, 3)),
    (float("inf"), LaunchConfig(128, 128, 64, 8, 3)),
)


def launch_config(pairs: int, experts: int, dtype: torch.dtype) -> LaunchConfig:
    """The table's config for `pairs` (token, slot) pairs spread over `experts` experts in activations of `dtype`."""
    per_expert = pairs / max(1, experts)
    config = next(c for bound, c in CONFIGS if per_expert <= bound)
    if dtype == torch.float32:
        config = replace(config, block_k=config.block_k // 2)
    return config


def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    """FP4 scales as multipliers: uint8 exponent bytes read as float8_e8m0fnu, 2^(s - 127)."""
    return scale.view(torch.float8_e8m0fnu) if scale.dtype == torch.uint8 else scale


def _dense(w: torch.Tensor, e: int, scale: torch.Tensor | None, block: tuple[int, int]) -> torch.Tensor:
    """Expert e's weight [out, in] in fp32, dequantised when it is FP8 or FP4 (uint8)."""
    if w.dtype == torch.uint8:
        return dequant_fp4(w[e], _e8m0(scale[e]))
    return dequant_fp8(w[e], scale[e], block) if scale is not None else w[e].float()


def _split(gate: torch.Tensor, up: torch.Tensor | None, scale: GateUp,
           block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, GateUp]:
    """Separate gate and up views (and scales) of fused [E, 2I, H] weights; separate weights pass through."""
    if up is not None:
        return gate, up, scale
    inter = gate.shape[1] // 2
    gs = scale[0]
    if gs is None:
        return gate[:, :inter], gate[:, inter:], scale
    rows = inter if gate.dtype == torch.uint8 else cdiv(inter, block[0])  # FP4: a scale row per weight row
    if gs.shape[1] != 2 * rows:
        raise ValueError(f"fused gate/up scales {list(gs.shape)}: the {inter} gate rows must end on a scale block "
                         f"({block[0]} rows for FP8, one for FP4)")
    return gate[:, :inter], gate[:, inter:], (gs[:, :rows], gs[:, rows:])


# ---------------------------------------------------------------- references


def reference_expert_hidden(x: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, *,
                            limit: float | None = None, alpha: float | None = None, bias: GateUp = (None, None),
                            scale: GateUp = (None, None), block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Each selected expert's activated hidden [N, k, I] for x [N, H], in fp32 math, one expert at a time."""
    gate, up, scale = _split(gate, up, scale, block)
    n, k = ids.shape
    hidden = x.new_zeros(n, k, gate.shape[1])
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        rows = x[tok].float()
        g = F.linear(rows, _dense(gate, e, scale[0], block), None if bias[0] is None else bias[0][e].float())
        u = F.linear(rows, _dense(up, e, scale[1], block), None if bias[1] is None else bias[1][e].float())
        if limit is not None:
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        h = F.silu(g) * u if alpha is None else (u + 1) * g * torch.sigmoid(g * alpha)
        hidden[tok, slot] = h.to(x.dtype)
    return hidden


def reference_expert_out(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None, down: torch.Tensor,
                         *, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Each selected expert's output [N, k, H] for hidden [N, k, I], times its weight when weights are given."""
    n, k = ids.shape
    out = hidden.new_zeros(n, k, down.shape[1])
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        o = F.linear(hidden[tok, slot].float(), _dense(down, e, scale, block),
                     None if bias is None else bias[e].float())
        out[tok, slot] = (o if weights is None else o * weights[tok, slot, None].float()).to(hidden.dtype)
    return out


def reference_moe_sum(out: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, H] = sum over slots of out [N, k, H] (times weights [N, k] if given), in fp32 (fp64 for fp64 outputs),
    in slot order, rounded once to out's dtype: how every backend of the model combines expert outputs
    (`MoE.combine`)."""
    acc = torch.promote_types(out.dtype, torch.float32)
    y = torch.zeros(out.shape[0], out.shape[2], dtype=acc, device=out.device)
    for j in range(out.shape[1]):
        y += out[:, j].to(acc) if weights is None else out[:, j].to(acc) * weights[:, j, None].to(acc)
    return y.to(out.dtype)


# ---------------------------------------------------------------- kernels


def _prepare(ids: torch.Tensor, experts: int, dtype: torch.dtype, config: LaunchConfig | None,
             alignment: Alignment | None) -> tuple[LaunchConfig, Alignment]:
    """The launch config (from the table unless given) and an alignment made with its block_m."""
    if config is None:
        config = launch_config(ids.numel(), experts, dtype)
    if alignment is None:
        alignment = align(ids, experts, config.block_m)
    if alignment.block_m != config.block_m:
        raise ValueError(f"alignment block {alignment.block_m} != launch block_m {config.block_m}")
    return config, alignment


def triton_expert_hidden(x: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, *,
                         limit: float | None = None, alpha: float | None = None, bias: GateUp = (None, None),
                         scale: GateUp = (None, None), block: tuple[int, int] = (128, 128),
                         alignment: Alignment | None = None, config: LaunchConfig | None = None) -> torch.Tensor:
    """The grouped gate/up GEMM behind `expert_hidden`: rows of x gathered by pair, SwiGLU in the epilogue."""
    fmt = weight_format(gate, require("gate_up_kernel", x))
    gate, up, scale = _split(gate, up, scale, block)
    if gate.stride() != up.stride():
        gate, up = gate.contiguous(), up.contiguous()
    gate, up = stored(gate, fmt), stored(up, fmt)  # also the stand-ins for absent pointers below
    n, k = ids.shape
    experts, inter, hid = gate.shape[0], gate.shape[1], x.shape[1]
    hidden = torch.empty(n, k, inter, dtype=x.dtype, device=x.device)
    if ids.numel() == 0:
        return hidden
    config, alignment = _prepare(ids, experts, x.dtype, config, alignment)
    for w, s in zip((gate, up), scale):
        check_weights(w, hid, fmt, s, block, config.block_k)
    x = x if x.stride(-1) == 1 else x.contiguous()
    gs, us = kernel_scale(scale[0], fmt, gate), kernel_scale(scale[1], fmt, up)
    if gs.stride() != us.stride():
        gs, us = gs.contiguous(), us.contiguous()
    gb, ub = (bias[0].contiguous(), bias[1].contiguous()) if bias[0] is not None else (gate, up)
    grid = (alignment.block_expert.numel(), cdiv(inter, config.block_n))
    from .fused_moe_jit import gate_up_kernel

    gate_up_kernel[grid](
        x, gate, up, gb, ub, gs, us, hidden, alignment.pairs, alignment.block_expert,
        k, ids.numel(), inter, hid, x.stride(0), *gate.stride(), *gs.stride(), gb.stride(0),
        0.0 if limit is None else limit, 0.0 if alpha is None else alpha,
        HAS_BIAS=bias[0] is not None, FORMAT=fmt, CLAMP=limit is not None, GPT_OSS=alpha is not None,
        SCALE_N=block[0], SCALE_K=block[1], DOT_F32=dot_f32(x), PRECISION=precision(x),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return hidden


def triton_expert_out(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None, down: torch.Tensor,
                      *, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                      block: tuple[int, int] = (128, 128), alignment: Alignment | None = None,
                      config: LaunchConfig | None = None) -> torch.Tensor:
    """The grouped down GEMM behind `expert_out`: hidden rows by pair, bias and routing weight in the epilogue."""
    fmt = weight_format(down, require("down_kernel", hidden))
    down = stored(down, fmt)  # also the stand-in for absent pointers below
    n, k = ids.shape
    experts, hid, inter = down.shape[0], down.shape[1], hidden.shape[-1]
    out = torch.empty(n, k, hid, dtype=hidden.dtype, device=hidden.device)
    if ids.numel() == 0:
        return out
    config, alignment = _prepare(ids, experts, hidden.dtype, config, alignment)
    check_weights(down, inter, fmt, scale, block, config.block_k)
    hidden = hidden.reshape(n * k, inter)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    s = kernel_scale(scale, fmt, down)
    b = bias.contiguous() if bias is not None else down
    w = weights.contiguous().view(-1) if weights is not None else down
    grid = (alignment.block_expert.numel(), cdiv(hid, config.block_n))
    from .fused_moe_jit import down_kernel

    down_kernel[grid](
        hidden, down, b, s, w, out, alignment.pairs, alignment.block_expert, ids.numel(), hid, inter,
        hidden.stride(0), *down.stride(), *s.stride(), b.stride(0),
        HAS_BIAS=bias is not None, FORMAT=fmt, WEIGHTED=weights is not None,
        SCALE_N=block[0], SCALE_K=block[1], DOT_F32=dot_f32(hidden), PRECISION=precision(hidden),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def triton_moe_sum(out: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel behind `moe_sum`: one program adds the k slots of a few tokens in fp32, in slot order."""
    require("sum_kernel", out)
    n, k, hid = out.shape
    y = torch.empty(n, hid, dtype=out.dtype, device=out.device)
    if n == 0:
        return y
    out = out.contiguous()
    w = weights.contiguous() if weights is not None else out
    block_h = min(1024, next_pow2(hid))
    block_t = max(1, min(16, 2048 // block_h))
    from .fused_moe_jit import sum_kernel

    sum_kernel[(cdiv(n, block_t), cdiv(hid, block_h))](
        out, w, y, n, hid, K=k, WEIGHTED=weights is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return y


# ---------------------------------------------------------------- dispatch


def expert_hidden(x: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, *,
                  limit: float | None = None, alpha: float | None = None, bias: GateUp = (None, None),
                  scale: GateUp = (None, None), block: tuple[int, int] = (128, 128),
                  alignment: Alignment | None = None, config: LaunchConfig | None = None) -> torch.Tensor:
    """Activated hidden [N, k, I] of the experts ids [N, k] selected for x [N, H]: the kernel where it runs."""
    if use_triton(x):
        return triton_expert_hidden(x, ids, gate, up, limit=limit, alpha=alpha, bias=bias, scale=scale, block=block,
                                    alignment=alignment, config=config)
    return reference_expert_hidden(x, ids, gate, up, limit=limit, alpha=alpha, bias=bias, scale=scale, block=block)


def expert_out(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None, down: torch.Tensor, *,
               bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
               block: tuple[int, int] = (128, 128), alignment: Alignment | None = None,
               config: LaunchConfig | None = None) -> torch.Tensor:
    """Expert outputs [N, k, H] of hidden [N, k, I] (weighted if weights [N, k] are given): the kernel where it runs."""
    if use_triton(hidden):
        return triton_expert_out(hidden, ids, weights, down, bias=bias, scale=scale, block=block,
                                 alignment=alignment, config=config)
    return reference_expert_out(hidden, ids, weights, down, bias=bias, scale=scale, block=block)


def moe_sum(out: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the k expert outputs per token [N, H] (weighted if weights are given), in slot order."""
    return triton_moe_sum(out, weights) if use_triton(out) else reference_moe_sum(out, weights)


def fused_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: torch.Tensor,
                  up: torch.Tensor | None, down: torch.Tensor, *, limit: float | None = None,
                  alpha: float | None = None,
                  biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  scales: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor] | None = None,
                  block: tuple[int, int] = (128, 128), want_hidden: bool = False, want_out: bool = False,
                  config: LaunchConfig | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y [N, H] = sum_k weights * expert_ids(x), plus hidden [N, k, I] / unweighted out [N, k, H] when asked.

    The routing weights are applied in the sum, not in the down GEMM: `out` is what the `experts.out` hook sees,
    rounded to the activation dtype, and y = moe_sum(out, weights) whether asked for or not (one convention with
    the model's CPU backends: `workbench.models.moe.MoE.combine`).
    """
    gb, ub, db = biases if biases is not None else (None, None, None)
    gs, us, ds = scales if scales is not None else (None, None, None)
    alignment = None
    if use_triton(x) and ids.numel():
        config = config or launch_config(ids.numel(), gate.shape[0], x.dtype)
        alignment = align(ids, gate.shape[0], config.block_m)
    hidden = expert_hidden(x, ids, gate, up, limit=limit, alpha=alpha, bias=(gb, ub), scale=(gs, us), block=block,
                           alignment=alignment, config=config)
    out = expert_out(hidden, ids, None, down, bias=db, scale=ds, block=block, alignment=alignment, config=config)
    y = moe_sum(out, weights)
    return y, hidden if want_hidden else None, out if want_out else None
