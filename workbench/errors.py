"""Error types that name what went wrong and where."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded safely; the message names the file and, where known, the tensor."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        self.file, self.tensor, self.reason = file, tensor, message
        where = ": ".join(str(p) for p in (file, tensor) if p)
        super().__init__(f"{where}: {message}" if where else message)


class HookError(RuntimeError):
    """A hook function misbehaved (wrong shape, wrong type); the message names the hook point."""
