"""Counting over token blocks, here or on a dask.distributed cluster.

While a Client is current (`distributed.default_client()`: the default client, which a `Client(...)` becomes unless
made with `set_as_default=False`, or the one a `with client.as_current():` block names), every analysis but
`saturation` runs over a store on its cluster, one task per group of stored chunks. Each task opens the store by its
path on its worker (workers must see the store at that path, e.g. on a shared filesystem; no routing data passes
through the client), counts its tokens with the same numba kernels, single-threaded (a worker runs one task per
thread), into fresh accumulators, and the tasks' accumulators are summed (max-merged for super experts) in a tree on
the workers. Every accumulator is exact under any split of the tokens (integer counts; router confidence sums in
fixed point), so the results equal the local ones exactly. The client still reads the hash-routing probe and the
token ids that vocabulary specialisation and mutual information group by (with against="predicted" and no
predicted_ids, the argmax of stored logits). Without a client, and for Datasets with no store path behind a scanned
variable (`from_cache`'s, or variables computed from stored ones, which dask then computes on its current
scheduler), an analysis counts in this process.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import xarray as xr

from .scan import Stored, store_paths, block_edges, locate, scan_blocks

TASKS_PER_THREAD = 4  # on a cluster, token groups per worker thread (fewer where the store has fewer chunks)
Acc = tuple  # (shape, dtype) or (shape, dtype, starting value) of an accumulator; it starts at 0 by default


def _fresh(accs: Sequence[Acc]) -> list[np.ndarray]:
    return [np.full(shape, fill[0] if fill else 0, dtype) for shape, dtype, *fill in accs]


def _add(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [x + y for x, y in zip(a, b)]


def later_max(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """(max, where...) of earlier tokens `a` and later tokens `b`: b's where its max is larger, so ties keep the
    earliest position, as one scan does."""
    later = b[0] > a[0]
    return [np.where(later, y, x) for x, y in zip(a, b)]


def _client() -> Any:
    """The current dask.distributed Client, or None."""
    distributed = sys.modules.get("distributed")
    if distributed is None:  # no client exists before distributed is imported (and importing it takes a while)
        return None
    try:
        return distributed.default_client()
    except ValueError:
        return None


def accumulate(ds: xr.Dataset, das: Sequence[xr.DataArray], step: Callable[..., None], accs: Sequence[Acc],
               per_token: Sequence[np.ndarray] = (), params: tuple = (), *, lookback: int = 0,
               merge: Callable[[list, list], list] = _add,
               sources: Sequence[str | None] | None = None) -> list[np.ndarray]:
    """Accumulators `accs` after `step(start, arrays, acc, *params)` counted every token block: the block of each
    of `das` then the same tokens of each `per_token` array, first token at `start` (`lookback` tokens before
    the block, but not before 0). With a current dask.distributed Client and every one of `das` in a store, one
    task per group of chunks, their accumulators merged in token order by `merge` (default: summed); else here.
    `sources`: the store path of each of `das` where they come from different stores (default: `ds`'s)."""
    client = _client()
    paths = store_paths(ds, das, sources)
    stored = [locate(da, path) for da, path in zip(das, paths)] if client is not None else []
    if client is None or any(x is None for x in stored):
        acc = _fresh(accs)
        for s, e, blocks in scan_blocks(ds, das, lookback, paths):
            step(s, [*blocks, *(p[s:e] for p in per_token)], acc, *params)
        return acc
    edges = block_edges(das, das[0].sizes["token"], TASKS_PER_THREAD * max(1, sum(client.nthreads().values())))
    starts = [max(s - lookback, 0) for s in edges[:-1]]
    parts = [client.submit(_task, stored, s, e, [p[s:e] for p in per_token], step, accs, params, pure=False)
             for s, e in zip(starts, edges[1:])]
    while len(parts) > 1:  # a tree of pairwise merges on the workers, neighbours in token order
        merged = [client.submit(merge, a, b, pure=False) for a, b in zip(parts[::2], parts[1::2])]
        parts = merged + parts[2 * len(merged):]
    return parts[0].result()


def _task(stored: list[Stored], start: int, stop: int, per_token: list[np.ndarray], step: Callable[..., None],
          accs: Sequence[Acc], params: tuple) -> list[np.ndarray]:
    """One task on a worker: tokens [start, stop) of each variable read from its store by path, counted into
    fresh accumulators."""
    try:
        blocks = [np.ascontiguousarray(x.reader()(start, stop)) for x in stored]
    except (OSError, KeyError) as err:
        raise FileNotFoundError(f"a worker on {socket.gethostname()} cannot read the store {stored[0].path} "
                                f"({err}); workers open it by that path, so it must be on a filesystem they share, "
                                "at the same path") from None
    acc = _fresh(accs)
    with _one_thread():
        step(start, [*blocks, *per_token], acc, *params)
    return acc


@contextmanager
def _one_thread() -> Iterator[None]:
    """numba kernels on this thread run on it alone (a worker runs one task per thread; parallel kernels in each
    would oversubscribe the cores). numba's count is per thread; torch's, which its OpenMP layer shares, is
    restored on leaving."""
    import torch

    threads = torch.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
