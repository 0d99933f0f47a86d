"""Reading token blocks: every analysis scans the token axis in blocks aligned to the store's chunks (at most
about `BLOCK_BYTES` of uncompressed data in flight, the next block read while the current one is counted); a
plain store variable is read straight from its zarr chunks, by path, from any process."""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dask.array
import numpy as np
import xarray as xr
import zarr

from ..parallel import torch_threads
from ..store.integrity import reading

BLOCK_BYTES = 64 << 20  # uncompressed bytes of one scanned token block (all variables read together)


@dataclass
class Stored:
    """Where a variable lies in its store: the path, the stored array and the orthogonal selection of it (on the
    token axis, the first position): all any process needs to read token blocks of it."""

    path: str
    name: str
    selection: tuple
    axis: int

    def reader(self) -> Callable[[int, int], np.ndarray]:
        """read(s, e): the selection's tokens [s, e), from one opening of the store."""
        array = zarr.open_group(self.path, mode="r")[self.name]
        t0 = self.selection[self.axis]

        def read(s: int, e: int) -> np.ndarray:
            sel = list(self.selection)
            sel[self.axis] = slice(t0 + s, t0 + e)
            with reading(array, tuple(sel)):  # a damaged chunk: a StoreError naming it
                return array.get_orthogonal_selection(tuple(sel))

        return read


def locate(da: xr.DataArray, source: str | None) -> Stored | None:
    """Where `da` lies in its store when it is a plain selection from a store variable, read directly from zarr
    (far fewer calls than one dask task per chunk, and by path from any process); None when `da` is anything
    else. The first block read so is checked against dask, read in this process."""
    if source is None or not isinstance(da.data, dask.array.Array) or "token" not in da.dims:
        return None
    layers = list(da.data.dask.layers)
    opened = [name for name in layers if name.startswith("open_dataset-")]
    if len(opened) != 1 or not all(name.startswith(("original-open_dataset-", "open_dataset-", "getitem-"))
                                   for name in layers):
        return None
    name = opened[0][len("open_dataset-"):].rsplit("-", 1)[0]
    path = source if "://" in source else os.path.abspath(source)  # workers may run in another directory
    try:
        group = zarr.open_group(path, mode="r")
        z = group[name]
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None
    if tuple(z.metadata.dimension_names or ()) != da.dims:
        return None
    selection: list[Any] = []
    for d, size in zip(da.dims, z.shape):
        if d == "token":
            pos = da.token.values
            if len(pos) == 0 or not np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
                return None
            selection.append(int(pos[0]))
        elif d == "layer":
            stored_layers = group["layer"][...].tolist()
            try:
                idx = np.asarray([stored_layers.index(int(x)) for x in da.layer.values])
            except ValueError:
                return None
            if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
                selection.append(slice(int(idx[0]), int(idx[0]) + len(idx)))
            else:
                selection.append(idx)
        elif da.sizes[d] != size:
            return None
        else:
            selection.append(slice(None))
    stored = Stored(path, name, tuple(selection), da.dims.index("token"))
    m = min(da.sizes["token"], 4096)
    first = da.isel(token=slice(0, m)).compute(scheduler="sync").values  # here, even with a dask client
    return stored if np.array_equal(stored.reader()(0, m), first, equal_nan=da.dtype.kind == "f") else None


def token_reader(da: xr.DataArray, source: str | None = None) -> Callable[[int, int], np.ndarray]:
    """read(s, e): the values of `da` at token positions [s, e) as numpy, token axis where `da` has it. With
    `source` (the store path, `ds.encoding["source"]`) a plain store variable is read straight from its zarr
    chunks, skipping dask's graph: the fast path for scanning a long store block by block."""
    stored = locate(da, source)
    if stored is not None:
        return stored.reader()
    if hasattr(da.data, "dask"):
        return lambda s, e: da.isel(token=slice(s, e)).values
    values = np.asarray(da.values)
    axis = da.dims.index("token")
    return lambda s, e: values[(slice(None),) * axis + (slice(s, e),)]


def store_paths(ds: xr.Dataset, das: Sequence[xr.DataArray],
             sources: Sequence[str | None] | None) -> list[str | None]:
    """The store path of each of `das`: `sources` where given (one per DataArray), else `ds`'s for all."""
    if sources is None:
        return [ds.encoding.get("source")] * len(das)
    if len(sources) != len(das):
        raise ValueError(f"sources names {len(sources)} stores for {len(das)} DataArrays")
    return list(sources)


def block_edges(das: Sequence[xr.DataArray], n: int, parts: int = 1) -> list[int]:
    """Block edges over [0, n): whole stored chunks (of the most finely chunked variable), about BLOCK_BYTES of
    all variables together per block, or less to make `parts` blocks where the chunks allow."""
    per_token = sum(da.dtype.itemsize * da.size // max(da.sizes["token"], 1) for da in das)
    target = max(1, min(BLOCK_BYTES // max(per_token, 1), -(-n // parts)))
    chunked = [da.chunksizes["token"] for da in das if da.chunks is not None]
    if not chunked:
        return [*range(0, n, target), n] if n else [0]
    edges, size = [0], 0
    for c in max(chunked, key=len):
        if size and size + c > target:
            edges.append(edges[-1] + size)
            size = 0
        size += c
    edges.append(edges[-1] + size)
    return edges


def scan_blocks(ds: xr.Dataset, das: Sequence[xr.DataArray], lookback: int = 0,
                sources: Sequence[str | None] | None = None) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """(start, stop, [block of each of `das`]) over the token axis, each block but the first starting `lookback`
    tokens early, reading the next block in a worker thread (zarr decompression and numba kernels both release
    the GIL) while the caller counts the current one. `sources`: the store path of each of `das` where they come
    from different stores (by default `ds`'s for all)."""
    n = das[0].sizes["token"]
    readers = [token_reader(da, source) for da, source in zip(das, store_paths(ds, das, sources))]
    edges = block_edges(das, n)
    spans = [(max(s - lookback, 0), e) for s, e in zip(edges[:-1], edges[1:])]

    def read(span: tuple[int, int]) -> list[np.ndarray]:
        return [np.ascontiguousarray(r(*span)) for r in readers]

    def prefetch(span: tuple[int, int]) -> Future:
        return pool.submit(contextvars.copy_context().run, read, span)  # dask reads see the caller's client

    with torch_threads(), ThreadPoolExecutor(1) as pool:
        pending = prefetch(spans[0]) if spans else None
        for i, span in enumerate(spans):
            blocks = pending.result()
            pending = prefetch(spans[i + 1]) if i + 1 < len(spans) else None
            yield span[0], span[1], blocks
