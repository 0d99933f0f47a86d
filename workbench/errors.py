"""Error types that name what went wrong and where."""

from __future__ import annotations


def shorten(text: str, limit: int = 500) -> str:
    """Text from a (possibly hostile) file, cut short so that it cannot flood an error message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded safely; the message names the file and, where known, the tensor."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        self.file, self.tensor, self.reason = file, tensor, message
        where = ": ".join(shorten(str(p)) for p in (file, tensor) if p)
        super().__init__(f"{where}: {message}" if where else message)


class HookError(RuntimeError):
    """A hook function misbehaved (wrong shape, wrong type); the message names the hook point."""


class UnknownHookError(HookError, KeyError):
    """No hook point matches a name or glob; the message names the closest ones. A KeyError too: a lookup of
    names that do not exist, as callers catching KeyError expect."""

    __str__ = Exception.__str__  # the message as written, not quoted as KeyError quotes its key


class StoreError(ValueError):
    """A store cannot be written or read as asked; the message says why and what to do instead."""


class InputError(ValueError, TypeError):
    """Model input that is not a non-empty [batch, tokens] tensor of ids inside the vocabulary.

    A ValueError, and a TypeError too, so that callers catching either for wrong dtypes keep working.
    """


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in the forward pass (see `CausalLM.check_finite`); names the first hook point
    (in forward order) and the first token position where one was seen."""

    def __init__(self, message: str, *, hook: str, layer: int | None, position: int):
        self.hook, self.layer, self.position = hook, layer, position
        super().__init__(message)


class KernelError(RuntimeError):
    """A Triton kernel cannot run here (triton missing, a CPU tensor outside the interpreter, a GPU older than the
    kernels support); the message names the kernel, the device and the remedy: the `backend="torch"` path."""
