"""When a Triton kernel runs instead of its PyTorch reference: on CUDA tensors, or anywhere under the interpreter."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1; triton reads it at import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def has_triton() -> bool:
    """Whether triton is installed (the runtime works without it, on the references)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """Run the kernel for tensor t: triton is installed and t is on a CUDA device, or the interpreter is on."""
    return has_triton() and (t.device.type == "cuda" or interpreting())


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b."""
    return -(-a // b)
