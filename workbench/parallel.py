"""Thread count of the numba kernels (indexer top-k, routing analyses).

numba's OpenMP threading layer sets the process-wide OpenMP thread count that torch reads too: left alone, the
first parallel kernel would silently raise torch's thread count to every core, changing the summation order,
and so the bits, of every later forward and backward. Kernels therefore run at torch's count and leave it as
they found it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads() -> Iterator[None]:
    """Within the block numba's parallel kernels use torch's thread count; on leaving, torch's count is restored."""
    import numba
    import torch

    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
