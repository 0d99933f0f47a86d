"""Quantised weights as published, dequantised on load one tensor at a time (docs/references.md, "Quantised
formats").

- FP8 (DeepSeek V3/V3.2/V4, Kimi): e4m3 weight [out, in] with one multiplier per block (128 x 128 unless
  `weight_block_size` says otherwise; edge blocks padded): `X.weight_scale_inv` in HF names, `X.scale` in
  V4's official names; fp32 or ue8m0 (power-of-two) scales.
- FP4 (DeepSeek-V4 routed experts, `expert_dtype: "fp4"`): e2m1 values packed two per byte in an int8
  [out, in / 2] tensor (low nibble = even column) with one ue8m0 scale per 32 inputs of a row: [out, in / 32].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import Config
from .errors import CheckpointError

SCALE_SUFFIXES = ("weight_scale_inv", "scale")  # `X.weight` -> `X.weight_scale_inv` (HF) or `X.scale` (V4)
SCALE_DTYPES = {"F32", "BF16", "F16", "F8_E8M0"}
FP4_GROUP = 32
# e2m1 code -> value: sign bit 3, exponent bits 2-1, mantissa bit 0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Scheme:
    """What a config declares: the FP8 block shape and whether routed experts are FP4."""

    block: tuple[int, int]
    fp4_experts: bool


def scheme(cfg: Config) -> Scheme | None:
    """The quantisation a config declares (`quantization_config.quant_method == "fp8"`), or None."""
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return None
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}",
                              file=cfg.file)
    experts = q.get("expert_dtype") or cfg.get("expert_dtype") or "fp8"
    if experts not in ("fp8", "fp4"):
        raise CheckpointError(f"expert_dtype {experts!r} is not supported (fp8, fp4)", file=cfg.file)
    return Scheme((block[0], block[1]), experts == "fp4")


def scale_of(weight: str, names) -> str | None:
    """The name of a weight's scale tensor among `names`, if it has one."""
    if not weight.endswith("weight"):
        return None
    base = weight[: -len("weight")]
    return next((base + s for s in SCALE_SUFFIXES if base + s in names), None)


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Scale grid of a [out, in] weight: one multiplier per block, edge blocks padded."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def fp4_scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """Scale grid of an unpacked [out, in] FP4 weight: one scale per 32 inputs of each row."""
    return shape[0], math.ceil(shape[1] / FP4_GROUP)


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W[i, j] = q[i, j] * scale[i // bo, j // bi], in fp32."""
    s = scale.float().repeat_interleave(block[0], 0)[: q.shape[0]].repeat_interleave(block[1], 1)[:, : q.shape[1]]
    return q.float() * s


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out, in / 2] holding two e2m1 codes per byte -> fp32 [out, in] (low nibble first)."""
    codes = packed.view(torch.uint8)
    pairs = torch.stack((codes & 0xF, codes >> 4), dim=-1).long()
    return torch.tensor(FP4_VALUES)[pairs].flatten(-2)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W[i, j] = e2m1(packed)[i, j] * scale[i, j // 32], in fp32."""
    w = unpack_fp4(packed)
    return w * scale.float().repeat_interleave(FP4_GROUP, 1)[:, : w.shape[1]]
