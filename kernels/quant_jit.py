"""Triton helpers of the GEMM kernels: stored weight codes to values (FP8 e4m3, FP4 e2m1 with e8m0 scales;
docs/references.md, "Quantised formats") and the tile dot that applies their scales."""

import triton
import triton.language as tl


@triton.jit
def e4m3_to_f32(code):
    """fp32 values of e4m3 bytes: sign, 4-bit exponent (bias 7), 3-bit mantissa; subnormals; NaN at 0x7F/0xFF."""
    c = code.to(tl.int32)
    exp = (c >> 3) & 0xF
    man = c & 0x7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)  # 2^(exp - 7) * (1 + man / 8)
    mag = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)  # subnormal: man / 8 * 2^-6
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def e2m1_to_f32(code):
    """fp32 values of e2m1 codes 0..15: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0 (quant.FP4_VALUES)."""
    c = code.to(tl.int32)
    exp = (c >> 1) & 0x3
    man = c & 0x1
    normal = (((exp + 126) << 23) | (man << 22)).to(tl.float32, bitcast=True)  # 2^(exp - 1) * (1 + man / 2)
    mag = tl.where(exp == 0, man.to(tl.float32) * 0.5, normal)
    return tl.where((c & 0x8) != 0, -mag, mag)


@triton.jit
def e8m0_to_f32(code):
    """fp32 values 2^(code - 127) of e8m0 bytes; 0xFF is NaN."""
    c = code.to(tl.int32)
    bits = tl.where(c == 0, 0x400000, c << 23)  # 2^-127 is an fp32 subnormal
    return tl.where(c == 255, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def weight_dot(acc, a, w, s, cols, col_ok, k0, n_in, stride_wn, stride_wk, stride_sn, stride_sk,
               FORMAT: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, DOT_F32: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + a @ W[cols, k0:k0 + BLOCK_K].T for a [BLOCK_M, BLOCK_K] and W [out, n_in] stored at w in FORMAT
    (backend.weight_format), its scales at s: FP8 one multiplier per SCALE_N x SCALE_K block (BLOCK_K divides
    SCALE_K: one per column of the tile, applied to the dot), FP4 one e8m0 exponent per 32 inputs of a row
    (applied in the tile, before the dot; BLOCK_K a multiple of 32)."""
    if DOT_F32:  # the interpreter multiplies bf16 bit patterns
        a = a.to(tl.float32)
    if FORMAT == "fp4":  # packed [out, n_in / 2]: low nibble = even input; scales [out, n_in / 32]
        half = tl.arange(0, BLOCK_K // 2)
        byte = tl.load(w + cols[:, None] * stride_wn + (k0 // 2 + half)[None, :] * stride_wk,
                       mask=col_ok[:, None] & (k0 // 2 + half < n_in // 2)[None, :], other=0)
        v = e2m1_to_f32(tl.join(byte & 0xF, byte >> 4).reshape(BLOCK_N, BLOCK_K))
        group = tl.arange(0, BLOCK_K // 32)
        exps = tl.load(s + cols[:, None] * stride_sn + (k0 // 32 + group)[None, :] * stride_sk,
                       mask=col_ok[:, None] & (k0 // 32 + group < (n_in + 31) // 32)[None, :], other=127)
        v = v.reshape(BLOCK_N, BLOCK_K // 32, 32) * e8m0_to_f32(exps)[:, :, None]
        acc = tl.dot(a, tl.trans(v.reshape(BLOCK_N, BLOCK_K)).to(a.dtype), acc, input_precision=PRECISION)
    else:
        kk = k0 + tl.arange(0, BLOCK_K)
        t = tl.load(w + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=(kk < n_in)[:, None] & col_ok[None, :], other=0.0)
        if FORMAT == "fp8_bits":
            t = e4m3_to_f32(t)
        t = t.to(a.dtype)  # exact for e4m3 in fp16 / bf16 / fp32
        if FORMAT == "plain":
            acc = tl.dot(a, t, acc, input_precision=PRECISION)
        else:
            scale = tl.load(s + (cols // SCALE_N) * stride_sn + (k0 // SCALE_K) * stride_sk, mask=col_ok, other=0.0)
            acc += tl.dot(a, t, input_precision=PRECISION) * scale[None, :]
    return acc
