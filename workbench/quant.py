"""Quantised weights as published: FP8 e4m3 with block scales (DeepSeek V3/R1/Kimi), dequantised on load."""

from __future__ import annotations

import math

import torch

from .config import Config
from .errors import CheckpointError

FP8_SCALE = "_scale_inv"  # HF name of a weight's block scale: `<name>.weight_scale_inv`


def fp8_block(cfg: Config) -> tuple[int, int] | None:
    """The FP8 scale block (rows, cols) a config declares, or None for an unquantised checkpoint."""
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return None
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}",
                              file=cfg.file)
    return block[0], block[1]


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Scale grid of a [out, in] weight: one multiplier per block, edge blocks padded."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W[i, j] = q[i, j] * scale[i // bo, j // bi], in fp32."""
    s = scale.float().repeat_interleave(block[0], 0)[: q.shape[0]].repeat_interleave(block[1], 1)[:, : q.shape[1]]
    return q.float() * s
