"""Quantised weights as published: what a config declares, scale shapes, the layout held in memory, and
dequantisation (docs/references.md, "Quantised formats").

On disk:
- FP8 (DeepSeek V3/V3.2/V4, Kimi): e4m3 weight [out, in] with one multiplier per block (128 x 128 unless
  `weight_block_size` says otherwise; edge blocks padded): `X.weight_scale_inv` in HF names, `X.scale` in
  V4's official names; fp32 or ue8m0 (power-of-two) scales.
- FP4 (DeepSeek-V4 routed experts, `expert_dtype: "fp4"`): e2m1 values packed two per byte in an int8
  [out, in / 2] tensor (low nibble = even column) with one ue8m0 scale per 32 inputs of a row: [out, in / 32].
- MXFP4 (GPT-OSS experts, `quant_method: "mxfp4"`): `X_blocks` uint8 [E, out, in / 32, 16] (the same e2m1
  pairs) and `X_scales` uint8 [E, out, in / 32], e8m0 exponents.

In memory (`workbench.load(dequantize=False)`, the layout `workbench.kernels` reads), the codes' dtype says the
format, with the block of their scale grid beside them:
- FP8: `float8_e4m3fn` codes [..., out, in], fp32 multipliers [..., ceil(out / bo), ceil(in / bi)];
- FP4 (V4 and MXFP4 alike): `uint8` codes [..., out, in / 2] (low nibble = even input), `uint8` e8m0
  exponents [..., out, in / 32] (value 2^(s - 127)): block (1, 32).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config
from .errors import CheckpointError

SCALE_SUFFIXES = ("weight_scale_inv", "scale")  # `X.weight` -> `X.weight_scale_inv` (HF) or `X.scale` (V4)
SCALE_DTYPES = {"F32", "BF16", "F16", "F8_E8M0"}
MX_SUFFIXES = ("_blocks", "_scales")  # MXFP4: `X_blocks` codes, `X_scales` exponents
FP4_GROUP = 32
FP4_BLOCK = (1, FP4_GROUP)  # the scale grid of FP4 codes: one exponent per 32 inputs of a row
FP8 = torch.float8_e4m3fn
# e2m1 code -> value: sign bit 3, exponent bits 2-1, mantissa bit 0
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Scheme:
    """What a config declares: the FP8 block shape, whether routed experts are FP4, and whether they are stored
    as MXFP4 (`_blocks` / `_scales`, the only quantised tensors then)."""

    block: tuple[int, int]
    fp4_experts: bool
    mxfp4: bool = False


def scheme(cfg: Config) -> Scheme | None:
    """The quantisation a config declares (`quantization_config.quant_method` "fp8" or "mxfp4"), or None."""
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "mxfp4":
        return Scheme(FP4_BLOCK, True, mxfp4=True)
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
    if weight.endswith(MX_SUFFIXES[0]):
        scale = weight[: -len(MX_SUFFIXES[0])] + MX_SUFFIXES[1]
        return scale if scale in names else None
    if not weight.endswith("weight"):
        return None
    base = weight[: -len("weight")]
    return next((base + s for s in SCALE_SUFFIXES if base + s in names), None)


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Scale grid of a [..., out, in] weight: one multiplier per block, edge blocks padded."""
    return *shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1])


def fp4_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Scale grid of an unpacked [..., out, in] FP4 weight: one scale per 32 inputs of each row."""
    return fp8_scale_shape(shape, FP4_BLOCK)


def weight_shape(stored: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The [..., out, in] shape of a weight stored quantised as `kind` ("fp8", "fp4" or "mxfp4"): FP4 packs two
    inputs per byte, MXFP4 also groups them in blocks [..., out, in / 32, 16]."""
    if kind == "fp4" and stored:
        return *stored[:-1], 2 * stored[-1]
    if kind == "mxfp4" and len(stored) >= 3 and stored[-1] == FP4_GROUP // 2:
        return *stored[:-2], stored[-2] * FP4_GROUP
    return tuple(stored)


def held_shape(shape: tuple[int, ...], fp4: bool) -> tuple[int, ...]:
    """Shape of the codes held in memory for a [..., out, in] weight: FP4 packs two inputs per byte."""
    return (*shape[:-1], shape[-1] // 2) if fp4 else tuple(shape)


def mxfp4_codes(blocks: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [..., out, in / 32, 16] as the packed codes [..., out, in / 2] (a view: rows are contiguous)."""
    return blocks.flatten(-2)


def cut_block(block: tuple[int, int], dim: int, size: int) -> tuple[int, int]:
    """The block of a weight cut into parts of `size` along `dim` (0 rows, 1 columns), so that each part's scale
    grid starts at its first row or column: the block side there shrinks to gcd(side, size)."""
    sides = list(block)
    sides[dim] = math.gcd(sides[dim], size)
    return sides[0], sides[1]


def cut_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dim: int, start: int,
            stop: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Rows or columns [start, stop) of FP8 codes [out, in] with their scales, the block side along `dim`
    shrunk by `cut_block` (each scale repeated over the finer grid, exactly): (codes, scales, block)."""
    new = cut_block(block, dim, stop - start)
    side = new[dim]
    finer = scale.repeat_interleave(block[dim] // side, dim)
    scale = finer.narrow(dim, start // side, math.ceil((stop - start) / side))
    return q.narrow(dim, start, stop - start), scale, new


def quantise_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [out, in] in the published FP8 layout (to write checkpoints for tests and benchmarks): e4m3
    codes and fp32 multipliers, each block's absolute maximum mapped to e4m3's largest value, 448."""
    rows, cols = fp8_scale_shape(w.shape, block)
    padded = w.new_zeros(rows * block[0], cols * block[1])
    padded[: w.shape[0], : w.shape[1]] = w
    scale = padded.view(rows, block[0], cols, block[1]).abs().amax((1, 3)).float().clamp(min=1e-12) / 448
    full = scale.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
    return (w / full).to(FP8), scale


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W[..., i, j] = q[..., i, j] * scale[..., i // bo, j // bi], in fp32."""
    rows, cols = q.shape[-2:]
    s = scale.float().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]
    return q.float() * s


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 or uint8 [..., in / 2] holding two e2m1 codes per byte -> fp32 [..., in] (low nibble first)."""
    codes = packed.view(torch.uint8)
    pairs = torch.stack((codes & 0xF, codes >> 4), dim=-1).long()
    return torch.tensor(FP4_VALUES, device=packed.device)[pairs].flatten(-2)


def e8m0(scale: torch.Tensor) -> torch.Tensor:
    """fp32 multipliers of scales held as e8m0 exponents (uint8: 2^(s - 127)) or as floats of any width."""
    return (scale.view(torch.float8_e8m0fnu) if scale.dtype == torch.uint8 else scale).float()


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W[..., i, j] = e2m1(packed)[..., i, j] * scale[..., i, j // 32], in fp32."""
    w = unpack_fp4(packed)
    return w * e8m0(scale).repeat_interleave(FP4_GROUP, -1)[..., : w.shape[-1]]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Held codes and scales (FP8 or FP4, told by the codes' dtype) as the fp32 weight [..., out, in]."""
    return dequant_fp8(codes, scale, block) if codes.dtype == FP8 else dequant_fp4(codes, scale)


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                    block: tuple[int, int]) -> torch.Tensor:
    """`dequantize(codes, scale, block)` written into `out` [out, in] (rounded once to its dtype) and returned. On
    CPU into fp32 or bf16 one fused numba pass (a table lookup and a multiply per value), else through fp32."""
    cpu = out.device.type == "cpu" and out.dtype in (torch.float32, torch.bfloat16) and out.dim() == 2
    if not (cpu and out.is_contiguous() and codes.is_contiguous() and scale.is_contiguous()):
        return out.copy_(dequantize(codes, scale, block))
    bf16 = out.dtype == torch.bfloat16
    dst = out.view(torch.int16).numpy().view(np.uint16) if bf16 else out.numpy()
    fp8, fp4 = _dequant_kernels()
    fp8_values, fp4_values, e8m0_values = DECODE_TABLES
    if codes.dtype == FP8:
        fp8(codes.view(torch.uint8).numpy(), scale.float().numpy(), fp8_values, block[0], block[1], dst, bf16)
    else:
        fp4(codes.view(torch.uint8).numpy(), scale.view(torch.uint8).numpy(), fp4_values, e8m0_values, dst, bf16)
    return out


def _table(dtype: torch.dtype) -> np.ndarray:
    """fp32 value of every byte read as `dtype` (NaN codes included: loading refuses them)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()


# fp32 value of each FP8 e4m3 byte, each FP4 e2m1 nibble and each e8m0 exponent byte: what every CPU decoder of
# held codes multiplies (this module's `dequantize_into` and the streaming kernels of workbench.models.stream)
DECODE_TABLES = (_table(FP8), np.array(FP4_VALUES, dtype=np.float32), _table(torch.float8_e8m0fnu))


@functools.cache
def _dequant_kernels():
    """The numba kernels of `dequantize_into` (compiled on first use; single-threaded, so they leave the process's
    thread counts alone). Each value is v = table[code] * scale in fp32, stored as fp32 or rounded to bf16 to
    nearest even (finite values), as torch rounds."""
    import numba

    @numba.njit(inline="always")
    def store(dst, i, j, v, bf16):  # pragma: no cover - compiled
        if bf16:
            bits = np.uint32(np.float32(v).view(np.uint32))
            dst[i, j] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> 16)
        else:
            dst[i, j] = v

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def fp8(codes, scale, table, bo, bi, dst, bf16):  # pragma: no cover - compiled
        rows, cols = codes.shape
        for i in range(rows):
            s = scale[i // bo]
            for start in range(0, cols, bi):
                m = s[start // bi]
                for j in range(start, min(start + bi, cols)):
                    store(dst, i, j, np.float32(table[codes[i, j]] * m), bf16)

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def fp4(codes, scale, values, exponents, dst, bf16):  # pragma: no cover - compiled
        rows, pairs = codes.shape
        half = FP4_GROUP // 2
        for i in range(rows):
            for g in range(scale.shape[1]):
                m = exponents[scale[i, g]]
                for j in range(g * half, min((g + 1) * half, pairs)):
                    c = codes[i, j]
                    store(dst, i, 2 * j, np.float32(values[c & 15] * m), bf16)
                    store(dst, i, 2 * j + 1, np.float32(values[c >> 4] * m), bf16)

    return fp8, fp4
