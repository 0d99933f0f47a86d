"""How the numba kernels (few-row streaming, indexer top-k, routing analyses) run: at torch's thread count, and
with a progress line while they compile.

numba's OpenMP threading layer sets the process-wide OpenMP thread count that torch reads too: left alone, the
first parallel kernel would silently raise torch's thread count to every core, changing the summation order,
and so the bits, of every later forward and backward. Kernels therefore run at torch's count and leave it as
they found it.

A kernel compiles on its first use after an install (numba then caches it on disk), which takes seconds: a
progress line says so, rather than a first forward or analysis seeming to hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def torch_threads() -> Iterator[None]:
    """Within the block numba's parallel kernels use torch's thread count; on leaving, torch's count is restored.
    From the first use on, every compile of a workbench kernel shows a progress line (`announce_compiles`)."""
    import numba
    import torch

    announce_compiles()
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def announce_compiles() -> None:
    """From now on, while numba compiles a kernel of workbench's for over a second (a cache miss: its first use
    after an install, or on new argument types), a progress line names it and its compile time."""
    global _notice
    if _notice is None:
        from numba.core import event

        _notice = _compile_notice(event.Listener)
        event.register("numba:compile", _notice)


_notice: Any = None  # the registered listener, once `announce_compiles` ran
SILENT_COMPILE_S = 1.0  # compiles shorter than this show nothing


def _compile_notice(listener: type) -> Any:
    """A numba event listener for the outermost compiles of `workbench.*` functions (the functions compiled on
    the way count as part of them): past SILENT_COMPILE_S, a progress line until the compile ends."""
    import threading
    import time

    from tqdm import tqdm  # text on stderr: a notebook widget drawn from a timer thread may land in another cell

    class CompileNotice(listener):
        def __init__(self) -> None:
            self.depth, self.bar, self.timer, self.start = 0, None, None, 0.0

        def show(self, name: str) -> None:
            self.bar = tqdm(desc=f"compiling {name} (first use; cached on disk after)", bar_format="{desc}: {elapsed}")
            self.bar.start_t = self.start  # elapsed since the compile began
            self.bar.refresh()

        def on_start(self, ev: Any) -> None:
            func = getattr(ev.data["dispatcher"], "py_func", None)
            if self.depth:
                self.depth += 1
            elif getattr(func, "__module__", "").startswith("workbench."):
                self.depth, self.start = 1, time.time()
                self.timer = threading.Timer(SILENT_COMPILE_S, self.show, (f"{func.__module__}.{func.__qualname__}",))
                self.timer.daemon = True
                self.timer.start()

        def on_end(self, ev: Any) -> None:
            if self.depth:
                self.depth -= 1
                if not self.depth:
                    self.timer.cancel()
                    self.timer.join()
                    if self.bar is not None:
                        self.bar.close()
                        self.bar = None

    return CompileNotice()
