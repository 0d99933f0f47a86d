"""When a Triton kernel runs instead of its PyTorch reference (on CUDA tensors, or anywhere under the interpreter),
whether it can run on the device at hand, and how it reads quantised weights there."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from workbench.errors import KernelError
from workbench.quant import FP4_GROUP, fp8_scale_shape

MIN_CAPABILITY = (8, 0)  # Ampere: bf16 and the tensor-core dots the kernels are compiled for (tests/test_aot.py)
FP8_CAPABILITY = (8, 9)  # Triton's float8e4nv (Ada, Hopper and later); below it the kernels decode e4m3 bytes


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1; triton reads it at import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def has_triton() -> bool:
    """Whether triton is installed (the runtime works without it, on the references)."""
    return importlib.util.find_spec("triton") is not None


def capability(t: torch.Tensor) -> tuple[int, int] | None:
    """Compute capability of the GPU that holds t, which the kernels are compiled for; None off CUDA."""
    return torch.cuda.get_device_capability(t.device) if t.device.type == "cuda" else None


def use_triton(t: torch.Tensor) -> bool:
    """Run the kernel for tensor t: triton is installed and t is on a CUDA device, or the interpreter is on."""
    return has_triton() and (capability(t) is not None or interpreting())


def require(kernel: str, t: torch.Tensor) -> tuple[int, int] | None:
    """The capability `kernel` compiles for on t's device (None under the interpreter), or KernelError saying
    why it cannot run there and what runs instead."""
    remedy = 'load the model with backend="torch" (or call the reference_* functions of workbench.kernels)'
    if not has_triton():
        raise KernelError(f"Triton kernel {kernel}: triton is not installed (pip install triton); or {remedy}")
    cap = capability(t)
    if cap is None and not interpreting():
        raise KernelError(f"Triton kernel {kernel} runs on CUDA tensors, got one on {t.device} (on a CPU only "
                          f"under TRITON_INTERPRET=1, for tests); {remedy}")
    if cap is not None and cap < MIN_CAPABILITY:
        name = f" ({torch.cuda.get_device_name(t.device)})" if t.device.type == "cuda" else ""
        raise KernelError(f"Triton kernel {kernel} cannot run on {t.device}{name}: compute capability "
                          f"{cap[0]}.{cap[1]}, the kernels need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; "
                          f"{remedy}")
    return cap


def weight_format(w: torch.Tensor, cap: tuple[int, int] | None) -> str:
    """How the GEMM kernels read weights w on a device of capability `cap` (None: the interpreter): "plain"
    (a float dtype), "fp8" (e4m3 converted by Triton), "fp8_bits" (e4m3 bytes decoded in the kernel where
    Triton has no float8e4nv) or "fp4" (uint8 pairs of e2m1 codes). docs/references.md, "Quantised formats"."""
    if w.dtype == torch.float8_e4m3fn:
        return "fp8" if cap is None or cap >= FP8_CAPABILITY else "fp8_bits"
    if w.dtype == torch.uint8:
        return "fp4"
    if not w.dtype.is_floating_point:
        raise TypeError(f"weights of dtype {w.dtype} are neither float, float8_e4m3fn (FP8) nor uint8 (FP4)")
    return "plain"


def stored(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w as the kernel loads it: e4m3 bytes as uint8 where the kernel decodes them itself."""
    return w.view(torch.uint8) if fmt == "fp8_bits" else w


def check_weights(w: torch.Tensor, n_in: int, fmt: str, scale: torch.Tensor | None, block: tuple[int, int],
                  block_k: int) -> None:
    """Weights [..., out, in] in `fmt` fit what the kernels read: FP4 packs two inputs a byte, one e8m0 byte per 32
    inputs, and K tiles span whole groups; FP8 scales cover `block`s, and each K tile sits in one of them."""
    if fmt == "plain":
        if scale is not None:
            raise ValueError(f"scales come with FP8 (float8_e4m3fn) or FP4 (uint8) weights, not {w.dtype} ones")
        return
    if scale is None:
        raise ValueError(f"{fmt} weights {list(w.shape)} need their scales")
    out = w.shape[-2]
    if fmt == "fp4":
        want = (*w.shape[:-1], cdiv(n_in, FP4_GROUP))
        if 2 * w.shape[-1] != n_in:
            raise ValueError(f"FP4 weights {list(w.shape)} hold {2 * w.shape[-1]} inputs a row, not {n_in}")
        if scale.dtype not in (torch.uint8, torch.float8_e8m0fnu):
            raise ValueError(f"FP4 scales are e8m0 exponent bytes (uint8), got {scale.dtype}")
        if block_k % FP4_GROUP:
            raise ValueError(f"block_k {block_k} must be a multiple of the FP4 scale group {FP4_GROUP}")
    else:
        want = (*w.shape[:-2], *fp8_scale_shape((out, n_in), block))
        if block[1] % block_k:
            raise ValueError(f"block_k {block_k} must divide the FP8 block's input size {block[1]}")
    if tuple(scale.shape) != want:
        raise ValueError(f"{fmt} weights {list(w.shape)} need scales of shape {list(want)}, got {list(scale.shape)}")


def kernel_scale(scale: torch.Tensor | None, fmt: str, dummy: torch.Tensor) -> torch.Tensor:
    """A scale as the kernels read it: FP8 multipliers in fp32, FP4 exponent bytes; `dummy` where none is read."""
    if fmt == "fp4":
        return scale.view(torch.uint8)
    return scale.float() if fmt != "plain" else dummy


def precision(t: torch.Tensor) -> str:
    """tl.dot input precision: exact fp32 products for fp32 activations (GPUs default to TF32)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def dot_f32(t: torch.Tensor) -> bool:
    """Upcast bf16 tiles to fp32 before tl.dot under the interpreter, which multiplies bf16 bit patterns."""
    return interpreting() and t.dtype == torch.bfloat16


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b."""
    return -(-a // b)
