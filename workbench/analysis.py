"""Routing analyses from the MoE literature over a routing Dataset: a store opened with `open_store` (dask-backed,
read chunk by chunk, never whole) or an in-memory trace built by `from_cache`. Both share one code path.

Every function scans the token axis in blocks aligned to the store's chunks (at most about `BLOCK_BYTES` of
uncompressed data in flight, the next block read while the current one is counted), accumulates with numba
kernels, and returns labelled xarray objects whose attrs state the metric's definition and, where one exists,
its value under uniform random routing. Definitions follow the papers (see the repository's references):

- load (DeepSeek, EPLB): per-expert counts and share, normalised entropy, CV, Gini, dead experts, MaxVio,
  relative load = actual / uniform; `eplb_weight` exports the [layers, experts] matrix EPLB rebalances.
- co-activation (OLMoE): N(i, j) / N(i) over all pairs of a token's top-k, or only adjacent ranks as OLMoE's
  released code counts them.
- domain and vocabulary specialisation (OLMoE): N(e, group) / N(group).
- consecutive-token repetition (Mixtral): same first choice; intersecting top-2 sets.
- router saturation (OLMoE) and top-k Jaccard between two traces of the same tokens.
- cross-layer joint routing counts, token/domain-expert mutual information, router confidence, super experts.

For code of its own (the widgets are such code), `routed_view`, `expert_count` and `token_reader` are the same
entry points the analyses use: the routed layers in (layer, token, k) order, the expert count, and a reader of
token ranges that goes straight to a store's zarr chunks.

Layers are the checkpoint's own numbers. Hash-routed layers (DeepSeek-V4's first layers route by token id) are
kept; every per-layer result carries a `hash_routed(layer)` coordinate, detected from the data (`hash_routed`).

Scaling out with dask.distributed: while a Client is current (`distributed.default_client()`: the default client,
which a `Client(...)` becomes unless made with `set_as_default=False`, or the one a `with client.as_current():`
block names), every analysis but `saturation` runs over a store on its cluster, one task per group of stored
chunks. Each task opens the store by its path on its worker (workers must see the store at that path, e.g. on a
shared filesystem; no routing data passes through the client), counts its tokens with the same numba kernels,
single-threaded (a worker runs one task per thread), into fresh accumulators, and the tasks' accumulators are
summed (max-merged for super experts) in a tree on the workers. Every accumulator is exact under any split of
the tokens (integer counts; router confidence sums in fixed point), so the results equal the local ones exactly.
The client still reads the hash-routing probe and the token ids that vocabulary specialisation and mutual
information group by (with against="predicted" and no predicted_ids, the argmax of stored logits). Without a
client, and for Datasets with no store path behind a scanned variable (`from_cache`'s, or variables computed from
stored ones, which dask then computes on its current scheduler), an analysis counts in this process.
"""

from __future__ import annotations

import contextvars
import math
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dask.array
import numba
import numpy as np
import xarray as xr
import zarr
from numba import njit, prange

from . import publish
from .parallel import torch_threads
from .store import TRAILING_DIMS, _layer, _var_name, trailing_dims

BLOCK_BYTES = 64 << 20  # uncompressed bytes of one scanned token block (all variables read together)
HASH_PROBE_TOKENS = 8192  # tokens inspected to tell hash-routed layers
HASH_MIN_REPEATS = 16  # repeated token ids needed before a layer can be called hash-routed
TASKS_PER_THREAD = 4  # on a cluster, token groups per worker thread (fewer where the store has fewer chunks)
# router confidence sums entropy and margin in units of 2**-28: exact in int64 under any split of the tokens
# (blocks, tasks), finer than the float32 values they come from, and good for 2**35 / log2(entries) tokens
FIXED_POINT = 1 << 28
ArrayLike = Any  # numpy array, DataArray, torch tensor or sequence
Acc = tuple  # (shape, dtype) or (shape, dtype, starting value) of an accumulator; it starts at 0 by default


# ---------------------------------------------------------------- building a routing Dataset in memory


def from_cache(cache: Mapping[str, Any], input_ids: ArrayLike, *, n_experts: int | None = None,
               logits: ArrayLike | None = None) -> xr.Dataset:
    """The Dataset `open_store` would give for one sequence, built from `model.run_with_cache` outputs, so that
    in-memory traces and stores go through the same analyses.

    `cache` must hold `layers.*.router.topk_ids` ([1, T, k]); any other hook becomes a variable named as in the
    store (`layers.3.experts.out` -> `experts_out(layer, token, k, hidden)`). `n_experts` defaults to the last
    dim of a cached `router.scores`/`router.logits`. `logits` (the forward's output) adds `predicted_ids(token)`.
    """
    ids = _numpy(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one sequence, shape [T] or [1, T]; got {list(ids.shape)} "
                         "(build one Dataset per sequence and xr.concat them along token)")
    n = len(ids)
    arrays = {name: _numpy(t) for name, t in cache.items()}
    for name, a in arrays.items():
        if a.ndim < 2 or a.shape[0] != 1 or a.shape[1] != n:
            raise ValueError(f"{name} has shape {list(a.shape)}; expected [1, {n}, ...] (one sequence of {n} tokens)")
    routed = sorted(_layer(h) for h in arrays if h.endswith(".router.topk_ids") and _layer(h) is not None)
    if not routed:
        raise ValueError("cache holds no layers.*.router.topk_ids; run_with_cache(ids, names=['layers.*.router.*'])")
    if n_experts is None:
        sized = [a.shape[-1] for h, a in arrays.items() if h.endswith((".router.scores", ".router.logits"))]
        if not sized:
            raise ValueError("pass n_experts= (or cache layers.*.router.scores) to say how many experts route")
        n_experts = sized[0]
    groups: dict[str, list[str]] = {}
    for hook in arrays:
        groups.setdefault(_var_name(hook)[0], []).append(hook)
    layer_coord = sorted({_layer(h) for h in arrays if _layer(h) is not None})
    index = {layer: j for j, layer in enumerate(layer_coord)}
    sizes: dict[str, int] = {"token": n, "layer": len(layer_coord)}
    data: dict[str, tuple] = {"input_ids": (("token",), ids.astype(np.int32))}
    for var, hooks in groups.items():
        key = _var_name(hooks[0])[1]
        first = arrays[hooks[0]]
        dtype = {"router_topk_ids": np.dtype(np.int16), "router_topk_weights": np.dtype(np.float16)}.get(
            var, first.dtype)
        var = {"router_topk_ids": "topk_ids", "router_topk_weights": "topk_weights"}.get(var, var)
        trailing = first.shape[2:]
        names = TRAILING_DIMS.get(key, ("k",) if var in ("topk_ids", "topk_weights") else ())
        dims = trailing_dims(var, names, trailing, sizes)
        if _layer(hooks[0]) is None:
            data[var] = (("token", *dims), first[0].astype(dtype))
            continue
        fill = -1 if dtype.kind == "i" else np.nan
        block = np.full((len(layer_coord), n, *trailing), fill, dtype)
        for hook in hooks:
            block[index[_layer(hook)]] = arrays[hook][0]
        data[var] = (("layer", "token", *dims), block)
    if logits is not None:
        lg = _numpy(logits)
        data["predicted_ids"] = (("token",), lg.reshape(-1, lg.shape[-1]).argmax(-1).astype(np.int32))
    k = data["topk_ids"][1].shape[-1]
    ds = xr.Dataset(data, coords={"layer": np.asarray(layer_coord, np.int64), "token": np.arange(n)},
                    attrs={"n_experts": int(n_experts), "k": int(k), "routed_layers": routed})
    publish.record_dataset(ds)  # only under `workbench publish` / `verify`: the routing hash
    return ds


def _numpy(x: ArrayLike) -> np.ndarray:
    """A torch tensor (bfloat16 as float32), DataArray or array-like as numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x.values if isinstance(x, xr.DataArray) else x)


# ---------------------------------------------------------------- reading token blocks


@dataclass
class _Stored:
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
            return array.get_orthogonal_selection(tuple(sel))

        return read


def _stored(da: xr.DataArray, source: str | None) -> _Stored | None:
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
    stored = _Stored(path, name, tuple(selection), da.dims.index("token"))
    m = min(da.sizes["token"], 4096)
    first = da.isel(token=slice(0, m)).compute(scheduler="sync").values  # here, even with a dask client
    return stored if np.array_equal(stored.reader()(0, m), first, equal_nan=da.dtype.kind == "f") else None


def token_reader(da: xr.DataArray, source: str | None = None) -> Callable[[int, int], np.ndarray]:
    """read(s, e): the values of `da` at token positions [s, e) as numpy, token axis where `da` has it. With
    `source` (the store path, `ds.encoding["source"]`) a plain store variable is read straight from its zarr
    chunks, skipping dask's graph: the fast path for scanning a long store block by block."""
    stored = _stored(da, source)
    if stored is not None:
        return stored.reader()
    if hasattr(da.data, "dask"):
        return lambda s, e: da.isel(token=slice(s, e)).values
    values = np.asarray(da.values)
    axis = da.dims.index("token")
    return lambda s, e: values[(slice(None),) * axis + (slice(s, e),)]


def _bounds(das: Sequence[xr.DataArray], n: int, parts: int = 1) -> list[int]:
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


def _order(da: xr.DataArray, *dims: str) -> xr.DataArray:
    """`da` with `dims` leading (a plain store variable already is: left untouched, so it keeps its fast reader)."""
    return da if da.dims[:len(dims)] == dims else da.transpose(*dims, ...)


def _scan(ds: xr.Dataset, das: Sequence[xr.DataArray],
          lookback: int = 0) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """(start, stop, [block of each of `das`]) over the token axis, each block but the first starting `lookback`
    tokens early, reading the next block in a worker thread (zarr decompression and numba kernels both release
    the GIL) while the caller counts the current one."""
    n = das[0].sizes["token"]
    source = ds.encoding.get("source")
    readers = [token_reader(da, source) for da in das]
    edges = _bounds(das, n)
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


def routed_view(ds: xr.Dataset) -> xr.Dataset:
    """`ds` restricted to its routed layers (a store's dense layers hold -1), topk_ids as (layer, token, k)."""
    if "topk_ids" not in ds:
        raise ValueError("the Dataset has no topk_ids; open a store with wb.open_store or build one with from_cache")
    if ds.topk_ids.dims != ("layer", "token", "k"):
        ds = ds.assign(topk_ids=_order(ds.topk_ids, "layer", "token", "k"))
    routed = ds.attrs.get("routed_layers")
    if routed is not None:
        keep = [int(x) for x in ds.layer.values if int(x) in set(routed)]
        if len(keep) < ds.sizes["layer"]:
            ds = ds.sel(layer=keep)
    if ds.sizes["layer"] == 0:
        raise ValueError("the Dataset holds no routed layer")
    return ds


def expert_count(ds: xr.Dataset) -> int:
    """How many experts route in `ds` (its `n_experts` attr), with a clear error where it is missing."""
    e = ds.attrs.get("n_experts")
    if not e:
        raise ValueError("the Dataset's attrs do not say n_experts; build it with from_cache(..., n_experts=E)")
    return int(e)


def _labels(labels: ArrayLike, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes int32 per token, label names) of per-token categorical labels (strings or integers)."""
    values = _numpy(labels)
    if values.shape != (n,):
        raise ValueError(f"labels must give one label per token ({n}); got shape {list(values.shape)}")
    names, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int32), names


def hash_routed(ds: xr.Dataset) -> xr.DataArray:
    """Per layer, whether its routing is a fixed function of the token id (DeepSeek-V4's hash layers): on the
    first HASH_PROBE_TOKENS tokens every repeated id got exactly the same ranked experts (and ids repeat)."""
    ds = routed_view(ds)
    m = min(ds.sizes["token"], HASH_PROBE_TOKENS)
    source = ds.encoding.get("source")
    ids = token_reader(ds.topk_ids, source)(0, m)
    tokens = token_reader(ds.input_ids, source)(0, m) if "input_ids" in ds else None
    if tokens is None:
        flags = [False] * len(ids)
    else:
        order = np.argsort(tokens, kind="stable")
        repeat = tokens[order][1:] == tokens[order][:-1]
        ranked = ids[:, order]
        flags = [bool(repeat.sum() >= HASH_MIN_REPEATS and (r[1:][repeat] == r[:-1][repeat]).all()) for r in ranked]
    return xr.DataArray(np.asarray(flags), coords={"layer": ds.layer.values}, dims="layer", name="hash_routed",
                        attrs={"definition": "routing is a function of the input token id on the probed tokens"})


def _finish(out: xr.Dataset, ds: xr.Dataset, **attrs: Any) -> xr.Dataset:
    """Common coords and attrs: the hash_routed flag per layer, n_experts, k, tokens scanned."""
    if "layer" in out.dims:
        out = out.assign_coords(hash_routed=hash_routed(ds))
    out.attrs.update({"n_experts": expert_count(ds), "k": int(ds.sizes["k"]), "tokens": int(ds.sizes["token"]),
                      **attrs})
    return out


# ---------------------------------------------------------------- accumulating over blocks, here or on a cluster


def _fresh(accs: Sequence[Acc]) -> list[np.ndarray]:
    return [np.full(shape, fill[0] if fill else 0, dtype) for shape, dtype, *fill in accs]


def _add(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [x + y for x, y in zip(a, b)]


def _later_max(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
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


def _accumulate(ds: xr.Dataset, das: Sequence[xr.DataArray], step: Callable[..., None], accs: Sequence[Acc],
                per_token: Sequence[np.ndarray] = (), params: tuple = (), *, lookback: int = 0,
                merge: Callable[[list, list], list] = _add) -> list[np.ndarray]:
    """Accumulators `accs` after `step(start, arrays, acc, *params)` counted every token block: the block of each
    of `das` then the same tokens of each `per_token` array, first token at `start` (`lookback` tokens before
    the block, but not before 0). With a current dask.distributed Client and every one of `das` in a store, one
    task per group of chunks, their accumulators merged in token order by `merge` (default: summed); else here."""
    client = _client()
    stored = [_stored(da, ds.encoding.get("source")) for da in das] if client is not None else []
    if client is None or any(x is None for x in stored):
        acc = _fresh(accs)
        for s, e, blocks in _scan(ds, das, lookback):
            step(s, [*blocks, *(p[s:e] for p in per_token)], acc, *params)
        return acc
    edges = _bounds(das, das[0].sizes["token"], TASKS_PER_THREAD * max(1, sum(client.nthreads().values())))
    starts = [max(s - lookback, 0) for s in edges[:-1]]
    parts = [client.submit(_task, stored, s, e, [p[s:e] for p in per_token], step, accs, params, pure=False)
             for s, e in zip(starts, edges[1:])]
    while len(parts) > 1:  # a tree of pairwise merges on the workers, neighbours in token order
        merged = [client.submit(merge, a, b, pure=False) for a, b in zip(parts[::2], parts[1::2])]
        parts = merged + parts[2 * len(merged):]
    return parts[0].result()


def _task(stored: list[_Stored], start: int, stop: int, per_token: list[np.ndarray], step: Callable[..., None],
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


# ---------------------------------------------------------------- kernels


@njit(parallel=True, cache=True, nogil=True)
def _count_load(ids, counts, tokens):  # pragma: no cover - compiled
    """counts[l, e] += slots routed to e; tokens[l] += tokens with routing."""
    L, T, K = ids.shape
    for l in prange(L):
        for t in range(T):
            if ids[l, t, 0] >= 0:
                tokens[l] += 1
            for s in range(K):
                e = ids[l, t, s]
                if e >= 0:
                    counts[l, e] += 1


@njit(parallel=True, cache=True, nogil=True)
def _count_pairs(ids, counts, adjacent):  # pragma: no cover - compiled
    """counts[l, i, j] += tokens with i and j both selected (adjacent: at neighbouring ranks), both orders;
    each pair is counted once in rank order and the matrix symmetrised at the end."""
    L, T, K = ids.shape
    E = counts.shape[1]
    for l in prange(L):
        m = np.zeros((E, E), np.int64)
        for t in range(T):
            for s in range(K - 1):
                a = ids[l, t, s]
                if a < 0:
                    continue
                stop = s + 2 if adjacent else K
                for r in range(s + 1, stop):
                    b = ids[l, t, r]
                    if b >= 0:
                        m[a, b] += 1
        for i in range(E):
            for j in range(E):
                counts[l, i, j] += m[i, j] + m[j, i]


@njit(parallel=True, cache=True, nogil=True)
def _count_repeats(ids, codes, out):  # pragma: no cover - compiled
    """Consecutive pairs (t-1, t) of the block with the same label (a block starting one token early pairs its
    first token with the one before). out[g, l] += (pairs, same top-1, top-2 sets intersect, |top-k ∩|)."""
    L, T, K = ids.shape
    for l in prange(L):
        for t in range(1, T):
            c = codes[t]
            a0, p0 = ids[l, t, 0], ids[l, t - 1, 0]
            if a0 < 0 or p0 < 0 or c < 0 or c != codes[t - 1]:
                continue
            out[c, l, 0] += 1
            if a0 == p0:
                out[c, l, 1] += 1
            if K > 1:
                a1, p1 = ids[l, t, 1], ids[l, t - 1, 1]
                if a0 == p0 or a0 == p1 or a1 == p0 or a1 == p1:
                    out[c, l, 2] += 1
            shared = 0
            for s in range(K):
                for r in range(K):
                    if ids[l, t, s] == ids[l, t - 1, r]:
                        shared += 1
            out[c, l, 3] += shared


@njit(parallel=True, cache=True, nogil=True)
def _count_joint(ids, codes, counts, top):  # pragma: no cover - compiled
    """counts[l, c, e] += slots of rank < top routed to e at tokens labelled c (c < 0: skipped)."""
    L, T, K = ids.shape
    for l in prange(L):
        for t in range(T):
            c = codes[t]
            if c < 0:
                continue
            for s in range(top):
                e = ids[l, t, s]
                if e >= 0:
                    counts[l, c, e] += 1


@njit(cache=True, nogil=True)
def _count_cross(ids, pairs, counts, top):  # pragma: no cover - compiled
    """counts[p, i, j] += tokens routed to i (rank < top) in layer pairs[p, 0] and to j in layer pairs[p, 1]."""
    P = pairs.shape[0]
    T = ids.shape[1]
    for p in range(P):
        la, lb = pairs[p, 0], pairs[p, 1]
        for t in range(T):
            for s in range(top):
                a = ids[la, t, s]
                if a < 0:
                    continue
                for r in range(top):
                    b = ids[lb, t, r]
                    if b >= 0:
                        counts[p, a, b] += 1


@njit(cache=True, nogil=True)
def _count_overlap(a, b, k, out):  # pragma: no cover - compiled
    """out[l] += (tokens, |A ∩ B| over the first k ranks, same top-1, |A ∩ B| / |A ∪ B|)."""
    L, T, _ = a.shape
    for l in range(L):
        for t in range(T):
            if a[l, t, 0] < 0 or b[l, t, 0] < 0:
                continue
            shared = 0
            for s in range(k):
                for r in range(k):
                    if a[l, t, s] == b[l, t, r]:
                        shared += 1
            out[l, 0] += 1
            out[l, 1] += shared
            out[l, 2] += a[l, t, 0] == b[l, t, 0]
            out[l, 3] += shared / (2 * k - shared)


@njit(cache=True, nogil=True)
def _confidence(values, logits, sums, hist_entropy, hist_margin):  # pragma: no cover - compiled
    """Per token: p = softmax(values) (logits) or values / sum(values); sums[l] += (tokens, entropy bits,
    top-1 minus top-2 p), the last two in units of 1 / FIXED_POINT; histograms of normalised entropy and
    margin over [0, 1]."""
    L, T, N = values.shape
    bins = hist_entropy.shape[1]
    p = np.empty(N)
    for l in range(L):
        for t in range(T):
            v = values[l, t]
            if v[0] != v[0]:
                continue
            hi = -np.inf
            for i in range(N):
                hi = max(hi, v[i])
            total = 0.0
            for i in range(N):
                p[i] = math.exp(v[i] - hi) if logits else max(float(v[i]), 0.0)
                total += p[i]
            if total <= 0:
                continue
            h, first, second = 0.0, 0.0, 0.0
            for i in range(N):
                q = p[i] / total
                if q > 0:
                    h -= q * math.log2(q)
                if q > first:
                    second = first
                    first = q
                elif q > second:
                    second = q
            sums[l, 0] += 1
            sums[l, 1] += int(h * FIXED_POINT + 0.5)
            sums[l, 2] += int((first - second) * FIXED_POINT + 0.5)
            hn = h / math.log2(N) if N > 1 else 0.0
            hist_entropy[l, min(int(hn * bins), bins - 1)] += 1
            hist_margin[l, min(int((first - second) * bins), bins - 1)] += 1


@njit(cache=True, nogil=True)
def _max_abs(ids, out, start, best, where_token, where_dim):  # pragma: no cover - compiled
    """best[l, e] = max |out[l, t, s, :]| over slots routed to e (NaN rows skipped), with its token and dim."""
    L, T, K, H = out.shape
    for l in range(L):
        for t in range(T):
            for s in range(K):
                e = ids[l, t, s]
                if e < 0:
                    continue
                row = out[l, t, s]
                for h in range(H):
                    x = abs(row[h])
                    if x > best[l, e]:
                        best[l, e] = x
                        where_token[l, e] = start + t
                        where_dim[l, e] = h


# ---------------------------------------------------------------- block steps (step(start, arrays, acc, *params))


def _load_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray]) -> None:
    _count_load(arrays[0], *acc)


def _coactivation_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], adjacent: bool) -> None:
    _count_pairs(arrays[0], acc[0], adjacent)
    _count_load(arrays[0], acc[1], acc[2])


def _joint_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], top: int) -> None:
    _count_joint(arrays[0], arrays[1], acc[0], top)


def _repetition_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray]) -> None:
    _count_repeats(arrays[0], arrays[1], acc[0])


def _cross_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], pairs: np.ndarray, top: int) -> None:
    _count_cross(arrays[0], pairs, acc[0], top)


def _confidence_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], logits: bool) -> None:
    _confidence(arrays[0].astype(np.float32, copy=False), logits, *acc)


def _max_abs_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], token0: int) -> None:
    ids, values = arrays
    _max_abs(ids, values.reshape(*values.shape[:3], -1), token0 + start, *acc)


# ---------------------------------------------------------------- load


def expert_load(ds: xr.Dataset) -> xr.Dataset:
    """Per layer and expert: routing counts and share; per layer: normalised entropy, coefficient of variation,
    Gini, dead experts, MaxVio and DeepSeek's relative load (actual / uniform)."""
    ds = routed_view(ds)
    E, L = expert_count(ds), ds.sizes["layer"]
    counts, tokens = _accumulate(ds, [ds.topk_ids], _load_step, [((L, E), np.int64), ((L,), np.int64)])
    return _load_dataset(counts, tokens, ds)


def _load_dataset(counts: np.ndarray, tokens: np.ndarray, ds: xr.Dataset) -> xr.Dataset:
    E, k = counts.shape[-1], ds.sizes["k"]
    total = counts.sum(-1, keepdims=True)
    share = counts / np.maximum(total, 1)
    mean = total / E
    safe = np.where(share > 0, share, 1.0)
    entropy = -(share * np.log(safe)).sum(-1) / math.log(E)
    cv = counts.std(-1) / np.maximum(mean[..., 0], 1e-300)
    ranked = np.sort(counts, -1)
    weights = 2 * np.arange(1, E + 1) - E - 1
    gini = (ranked * weights).sum(-1) / (E * np.maximum(total[..., 0], 1))
    maxvio = (counts.max(-1) - mean[..., 0]) / np.maximum(mean[..., 0], 1e-300)
    uniform = tokens[:, None] * k / E
    dims2 = ("layer", "expert")
    out = xr.Dataset(
        {"counts": (dims2, counts, {"definition": "routing slots (token, rank) that selected the expert"}),
         "share": (dims2, share, {"definition": "counts / all slots of the layer", "baseline": 1 / E}),
         "relative_load": (dims2, counts / np.maximum(uniform, 1e-300),
                           {"definition": "DeepSeek's relative load: counts / (tokens k / E)", "baseline": 1.0}),
         "dead": (dims2, counts == 0, {"definition": "the expert was never selected"}),
         "n_dead": ("layer", (counts == 0).sum(-1), {"definition": "experts never selected"}),
         "entropy": ("layer", entropy, {"definition": "entropy of share / ln E (1 = perfectly balanced)",
                                        "baseline": 1.0}),
         "cv": ("layer", cv, {"definition": "std / mean of the counts over experts (population std)",
                              "baseline": "uniform routing: sqrt((E - k) / (tokens k))"}),
         "gini": ("layer", gini, {"definition": "Gini coefficient of the counts (0 = balanced)", "baseline": 0.0}),
         "maxvio": ("layer", maxvio, {"definition": "MaxVio = (max load - mean load) / mean load", "baseline": 0.0}),
         "tokens": ("layer", tokens, {"definition": "tokens with routing in the layer"})},
        coords={"layer": ds.layer.values, "expert": np.arange(E)})
    return _finish(out, ds, metric="expert load")


def eplb_weight(ds: xr.Dataset) -> Any:
    """The [layers, logical experts] load matrix DeepSeek's EPLB `rebalance_experts(weight, ...)` takes, as a
    torch int64 tensor, from a routing Dataset or an `expert_load` result (rows in the `layer` order)."""
    import torch

    load = ds if "counts" in ds and "topk_ids" not in ds else expert_load(ds)
    return torch.from_numpy(np.ascontiguousarray(load.counts.transpose("layer", "expert").values))


# ---------------------------------------------------------------- co-activation


def coactivation(ds: xr.Dataset, mode: str = "all_pairs") -> xr.Dataset:
    """Expert co-activation N(i, j) / N(i) per layer: of the tokens that selected expert i, the share that also
    selected j. mode="all_pairs": any two of the top-k; "adjacent_ranks": only neighbouring ranks of the ranked
    top-k (k - 1 pairs per token), as OLMoE's released analysis counts them."""
    if mode not in ("all_pairs", "adjacent_ranks"):
        raise ValueError(f"mode must be 'all_pairs' or 'adjacent_ranks', got {mode!r}")
    ds = routed_view(ds)
    E, L, k = expert_count(ds), ds.sizes["layer"], ds.sizes["k"]
    pairs, counts, _ = _accumulate(ds, [ds.topk_ids], _coactivation_step,
                                   [((L, E, E), np.int64), ((L, E), np.int64), ((L,), np.int64)],
                                   params=(mode == "adjacent_ranks",))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = pairs / counts[:, :, None]
    baseline = (k - 1) / (E - 1) if mode == "all_pairs" else 2 * (k - 1) / (k * (E - 1))
    dims = ("layer", "expert_i", "expert_j")
    out = xr.Dataset(
        {"coactivation": (dims, ratio, {"definition": "N(i, j) / N(i); NaN where expert i was never selected",
                                        "baseline": baseline}),
         "pairs": (dims, pairs, {"definition": "N(i, j): tokens with both i and j (symmetric, diagonal 0)"}),
         "counts": (("layer", "expert_i"), counts, {"definition": "N(i): tokens that selected expert i"})},
        coords={"layer": ds.layer.values, "expert_i": np.arange(E), "expert_j": np.arange(E)})
    return _finish(out, ds, metric="co-activation", mode=mode,
                   baseline=f"uniform routing: {'(k-1)/(E-1)' if mode == 'all_pairs' else '2(k-1)/(k(E-1))'}")


# ---------------------------------------------------------------- specialisation and mutual information


def _joint(ds: xr.Dataset, codes: np.ndarray, groups: int, top: int) -> np.ndarray:
    """counts[layer, group, expert] of routing slots of rank < top, tokens grouped by `codes` (-1: skipped)."""
    E, L = expert_count(ds), ds.sizes["layer"]
    return _accumulate(ds, [ds.topk_ids], _joint_step, [((L, groups, E), np.int64)], [codes], (top,))[0]


def domain_specialisation(ds: xr.Dataset, labels: ArrayLike) -> xr.Dataset:
    """OLMoE's domain specialisation: of a domain's tokens, the share that has expert e among its top-k,
    N(e, domain) / N(domain) (uniform k/E); `relative` is that over k/E, DeepSeek's relative load per
    (domain, layer, expert). `labels`: one domain label per token."""
    ds = routed_view(ds)
    E, k = expert_count(ds), ds.sizes["k"]
    codes, names = _labels(labels, ds.sizes["token"])
    counts = _joint(ds, codes, len(names), k).transpose(1, 0, 2)
    tokens = np.bincount(codes, minlength=len(names))
    share = counts / np.maximum(tokens, 1)[:, None, None]
    dims = ("domain", "layer", "expert")
    out = xr.Dataset(
        {"specialisation": (dims, share, {"definition": "N(e, domain) / N(domain)", "baseline": k / E}),
         "relative": (dims, share * E / k, {"definition": "specialisation / (k / E): actual / uniform",
                                            "baseline": 1.0}),
         "counts": (dims, counts, {"definition": "N(e, domain): the domain's tokens with e in their top-k"}),
         "tokens": ("domain", tokens, {"definition": "N(domain)"})},
        coords={"domain": names, "layer": ds.layer.values, "expert": np.arange(E)})
    return _finish(out, ds, metric="domain specialisation", baseline="uniform routing: k/E")


def _token_ids(ds: xr.Dataset, against: str | ArrayLike) -> np.ndarray:
    """One token id per position (-1: none): the input, the next input, the predicted id, or given ids."""
    n = ds.sizes["token"]
    if not isinstance(against, str):
        ids = _numpy(against).astype(np.int64)
        if ids.shape != (n,):
            raise ValueError(f"against must give one token id per position ({n}); got shape {list(ids.shape)}")
        return ids
    if against in ("input", "next"):
        ids = np.concatenate([b for _, _, (b,) in _scan(ds, [ds.input_ids])]).astype(np.int64)
        return ids if against == "input" else np.append(ids[1:], -1)
    if against == "predicted":
        if "predicted_ids" in ds:
            return np.concatenate([b for _, _, (b,) in _scan(ds, [ds.predicted_ids])]).astype(np.int64)
        if "logits" in ds:
            logits = _order(ds.logits, "token")
            return np.concatenate([b.argmax(-1) for _, _, (b,) in _scan(ds, [logits])]).astype(np.int64)
        raise ValueError("against='predicted' needs predicted_ids (from_cache(..., logits=...)) or a stored logits "
                         "variable (trace with names=['logits'])")
    raise ValueError(f"against must be 'input', 'next', 'predicted' or per-token ids, got {against!r}")


def vocabulary_specialisation(ds: xr.Dataset, against: str | ArrayLike = "input", *, min_count: int = 10,
                              top1: bool = False) -> xr.Dataset:
    """OLMoE's vocabulary specialisation: for each token id x seen at least `min_count` times, the share of its
    occurrences routed to expert e, N(e, x) / N(x), with x the input token, the next token or the predicted
    token (`against`). top1=True counts only the first choice (as OLMoE's released script does)."""
    ds = routed_view(ds)
    E, k = expert_count(ds), ds.sizes["k"]
    ids = _token_ids(ds, against)
    occurrences = np.bincount(ids[ids >= 0])
    kept = np.flatnonzero(occurrences >= min_count)
    lut = np.full(max(len(occurrences), 1), -1, np.int32)
    lut[kept] = np.arange(len(kept))
    codes = np.where(ids >= 0, lut[np.clip(ids, 0, None)], -1).astype(np.int32)
    counts = _joint(ds, codes, len(kept), 1 if top1 else k)
    n = occurrences[kept]
    share = counts / np.maximum(n, 1)[None, :, None]
    baseline = 1 / E if top1 else k / E
    dims = ("layer", "token_id", "expert")
    out = xr.Dataset(
        {"specialisation": (dims, share, {"definition": "N(e, x) / N(x)", "baseline": baseline}),
         "counts": (dims, counts, {"definition": "N(e, x): occurrences of x routed to e"}),
         "occurrences": ("token_id", n, {"definition": "N(x)"}),
         "top_expert": (("layer", "token_id"), share.argmax(-1), {"definition": "the expert x goes to most"}),
         "top_share": (("layer", "token_id"), share.max(-1), {"definition": "max over e of N(e, x) / N(x)"}),
         "mean_top_share": ("layer", share.max(-1).mean(-1) if len(kept) else np.full(len(share), np.nan),
                            {"definition": "top_share averaged over the kept token ids"})},
        coords={"layer": ds.layer.values, "token_id": kept, "expert": np.arange(E)})
    name = against if isinstance(against, str) else "given"
    return _finish(out, ds, metric="vocabulary specialisation", against=name, min_count=min_count,
                   top1=int(top1), baseline=f"uniform routing: {'1/E' if top1 else 'k/E'}")


def _mi_bits(joint: np.ndarray) -> np.ndarray:
    """Mutual information (bits) of each layer's [label, expert] count table."""
    p = joint / np.maximum(joint.sum((1, 2), keepdims=True), 1)
    px, pe = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (px * pe)), 0.0)
    return terms.sum((1, 2))


def _entropy_bits(p: np.ndarray, axis: int) -> np.ndarray:
    p = p / np.maximum(p.sum(axis, keepdims=True), 1e-300)
    return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis)


def mutual_information(ds: xr.Dataset, labels: str | ArrayLike = "token", *, top1: bool = False,
                       seed: int = 0) -> xr.Dataset:
    """Mutual information in bits between a token's label and the experts it is routed to, per layer: labels
    "token" (the input token id) or one label per token (e.g. its domain). Each routing slot is one (label,
    expert) sample (top1: first choice only). `mi_shuffled` is the same with the labels randomly permuted over
    the tokens (seed): the finite-sample value of independent labels, to subtract."""
    ds = routed_view(ds)
    k = ds.sizes["k"]
    if isinstance(labels, str) and labels == "token":
        ids = _token_ids(ds, "input")
        names, codes = np.unique(ids, return_inverse=True)
        codes = codes.astype(np.int32)
    else:
        codes, names = _labels(labels, ds.sizes["token"])
    top = 1 if top1 else k
    joint = _joint(ds, codes, len(names), top)
    shuffled = _joint(ds, codes[np.random.default_rng(seed).permutation(len(codes))], len(names), top)
    out = xr.Dataset(
        {"mi": ("layer", _mi_bits(joint), {"definition": "I(label; expert) in bits over routing slots"}),
         "mi_shuffled": ("layer", _mi_bits(shuffled), {"definition": "the same with labels permuted over tokens",
                                                       "baseline": "independent labels"}),
         "h_expert": ("layer", _entropy_bits(joint.sum(1), -1), {"definition": "H(expert) in bits"}),
         "h_label": ("layer", _entropy_bits(joint.sum(2), -1), {"definition": "H(label) in bits"})},
        coords={"layer": ds.layer.values})
    return _finish(out, ds, metric="mutual information", labels=labels if isinstance(labels, str) else "given",
                   top1=int(top1), seed=seed)


# ---------------------------------------------------------------- consecutive tokens, checkpoints, layers


def repetition(ds: xr.Dataset, labels: ArrayLike | None = None) -> xr.Dataset:
    """Mixtral's consecutive-token repetition per layer: the share of consecutive token pairs with the same
    first choice (random 1/E), with intersecting top-2 sets ("first or second choice", random
    1 - C(E-2, 2) / C(E, 2)), and their mean top-k overlap |E_t ∩ E_t-1| / k (random k/E). With per-token
    `labels` (e.g. domain) pairs are counted per label and pairs across a label change are left out."""
    ds = routed_view(ds)
    E, L, k, n = expert_count(ds), ds.sizes["layer"], ds.sizes["k"], ds.sizes["token"]
    if labels is None:
        codes, names = np.zeros(n, np.int32), None
    else:
        codes, names = _labels(labels, n)
    groups = 1 if names is None else len(names)
    (out,) = _accumulate(ds, [ds.topk_ids], _repetition_step, [((groups, L, 4), np.int64)], [codes], lookback=1)
    pairs = np.maximum(out[..., 0], 1)
    second = out[..., 2] / pairs if k > 1 else np.full(out.shape[:2], np.nan)
    dims = ("domain", "layer")
    res = xr.Dataset(
        {"first": (dims, out[..., 1] / pairs, {"definition": "same top-1 expert as the previous token",
                                               "baseline": 1 / E}),
         "first_or_second": (dims, second, {"definition": "top-2 sets of consecutive tokens intersect",
                                            "baseline": 1 - math.comb(E - 2, 2) / math.comb(E, 2)}),
         "overlap": (dims, out[..., 3] / pairs / k, {"definition": "mean |E_t ∩ E_t-1| / k", "baseline": k / E}),
         "pairs": (dims, out[..., 0], {"definition": "consecutive pairs counted"})},
        coords={"domain": names if names is not None else [""], "layer": ds.layer.values})
    if names is None:
        res = res.squeeze("domain", drop=True)
    return _finish(res, ds, metric="consecutive-token repetition")


def saturation(a: xr.Dataset, b: xr.Dataset, k: int | None = None) -> xr.Dataset:
    """OLMoE's router saturation between two traces of the same tokens (e.g. an early and the final checkpoint):
    per layer the mean |E_a(x) ∩ E_b(x)| / k over tokens (first k ranks, default all), top-1 agreement and the
    top-k Jaccard |A ∩ B| / |A ∪ B|, with their uniform-random values."""
    a, b = routed_view(a), routed_view(b)
    if a.sizes["token"] != b.sizes["token"] or list(a.layer.values) != list(b.layer.values):
        raise ValueError(f"the traces differ: {a.sizes['token']} vs {b.sizes['token']} tokens, layers "
                         f"{a.layer.values.tolist()} vs {b.layer.values.tolist()}")
    E = expert_count(a)
    k = min(a.sizes["k"], b.sizes["k"]) if k is None else int(k)
    if not 1 <= k <= min(a.sizes["k"], b.sizes["k"]):
        raise ValueError(f"k must be between 1 and {min(a.sizes['k'], b.sizes['k'])}, got {k}")
    same_tokens = "input_ids" in a and "input_ids" in b
    out = np.zeros((a.sizes["layer"], 4))
    source_b = b.encoding.get("source")
    read_b = token_reader(b.topk_ids, source_b)
    read_tokens = token_reader(b.input_ids, source_b) if same_tokens else None
    scanned = [a.topk_ids, a.input_ids] if same_tokens else [a.topk_ids]
    for s, e, blocks in _scan(a, scanned):
        if same_tokens and not np.array_equal(blocks[1], read_tokens(s, e)):
            raise ValueError(f"the traces route different tokens (first difference in positions {s}..{e})")
        _count_overlap(blocks[0], np.ascontiguousarray(read_b(s, e)).astype(blocks[0].dtype), k, out)
    n = np.maximum(out[:, 0], 1)
    jaccard = sum(math.comb(k, i) * math.comb(E - k, k - i) / math.comb(E, k) * i / (2 * k - i)
                  for i in range(k + 1))
    res = xr.Dataset(
        {"saturation": ("layer", out[:, 1] / n / k, {"definition": "mean |E_a ∩ E_b| / k", "baseline": k / E}),
         "top1": ("layer", out[:, 2] / n, {"definition": "same first choice", "baseline": 1 / E}),
         "jaccard": ("layer", out[:, 3] / n, {"definition": "mean |E_a ∩ E_b| / |E_a ∪ E_b|", "baseline": jaccard})},
        coords={"layer": a.layer.values})
    return _finish(res, a, metric="router saturation", k_compared=k)


def cross_layer(ds: xr.Dataset, pairs: Sequence[tuple[int, int]] | None = None, *,
                top1: bool = False) -> xr.Dataset:
    """Joint routing across layers: for each (layer_from, layer_to) pair (default: consecutive routed layers),
    N(i, j) = tokens routed to i in layer_from and to j in layer_to (all k x k rank combinations, or first
    choices with top1), and the conditional N(i, j) / N_from(i) (uniform: k/E, or 1/E with top1)."""
    ds = routed_view(ds)
    E, k = expert_count(ds), ds.sizes["k"]
    layers = [int(x) for x in ds.layer.values]
    pairs = list(zip(layers[:-1], layers[1:])) if pairs is None else [(int(p), int(q)) for p, q in pairs]
    missing = sorted({x for pair in pairs for x in pair} - set(layers))
    if missing or not pairs:
        raise ValueError(f"layer pairs must name routed layers {layers}; not found: {missing or 'no pairs'}")
    index = np.asarray([[layers.index(p), layers.index(q)] for p, q in pairs], np.int64)
    top = 1 if top1 else k
    (counts,) = _accumulate(ds, [ds.topk_ids], _cross_step, [((len(pairs), E, E), np.int64)], params=(index, top))
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = counts / (counts.sum(-1, keepdims=True) / top)
    dims = ("pair", "expert_i", "expert_j")
    out = xr.Dataset(
        {"counts": (dims, counts, {"definition": "tokens routed to i in layer_from and j in layer_to"}),
         "conditional": (dims, conditional, {"definition": "N(i, j) / N_from(i)", "baseline": top / E})},
        coords={"pair": np.arange(len(pairs)), "layer_from": ("pair", [p for p, _ in pairs]),
                "layer_to": ("pair", [q for _, q in pairs]), "expert_i": np.arange(E), "expert_j": np.arange(E)})
    return _finish(out, ds, metric="cross-layer joint routing", top1=int(top1))


# ---------------------------------------------------------------- router confidence and super experts


def router_confidence(ds: xr.Dataset, *, bins: int = 20) -> xr.Dataset:
    """Per layer, how decided the router is: mean entropy (bits) of its distribution over experts and mean
    top-1 minus top-2 probability, with histograms of both (entropy normalised to [0, 1]). Uses `router_scores`
    (normalised to sum 1) if recorded, else `router_logits` (softmax), else `topk_weights` (over the k chosen)."""
    ds = routed_view(ds)
    for var, logits in (("router_scores", False), ("router_logits", True), ("topk_weights", False)):
        if var in ds:
            break
    else:
        raise ValueError("router confidence needs router_scores, router_logits or topk_weights")
    values = _order(ds[var].sel(layer=ds.layer.values), "layer", "token")
    L = ds.sizes["layer"]
    sums, hist_h, hist_m = _accumulate(ds, [values], _confidence_step,
                                       [((L, 3), np.int64), ((L, bins), np.int64), ((L, bins), np.int64)],
                                       params=(logits,))
    units = np.maximum(sums[:, 0], 1) * FIXED_POINT  # a mean's denominator: tokens in sum units
    size = values.shape[-1]
    edges = np.linspace(0, 1, bins + 1)
    out = xr.Dataset(
        {"entropy": ("layer", sums[:, 1] / units,
                     {"definition": f"mean entropy in bits over {size} {var} entries", "maximum": math.log2(size)}),
         "margin": ("layer", sums[:, 2] / units, {"definition": "mean top-1 minus top-2 probability"}),
         "entropy_hist": (("layer", "bin"), hist_h, {"definition": "tokens per bin of entropy / log2(n)"}),
         "margin_hist": (("layer", "bin"), hist_m, {"definition": "tokens per bin of the margin"}),
         "tokens": ("layer", sums[:, 0])},
        coords={"layer": ds.layer.values, "bin": (edges[:-1] + edges[1:]) / 2})
    return _finish(out, ds, metric="router confidence", source=var)


def super_experts(ds: xr.Dataset, *, quantile: float = 0.995, ratio: float = 0.1) -> xr.Dataset:
    """Super experts: per (layer, expert), the maximum |output| of its down projection over the tokens it served
    (`experts_out`, recorded with names=["layers.*.experts.out"]) and where it occurred. An expert is flagged
    when its maximum exceeds the `quantile` of all experts' maxima and `ratio` times the largest."""
    ds = routed_view(ds)
    if "experts_out" not in ds:
        raise ValueError("super experts need experts_out: trace with names=['layers.*.experts.out'] (or cache it)")
    E, L = expert_count(ds), ds.sizes["layer"]
    out = _order(ds.experts_out.sel(layer=ds.layer.values), "layer", "token", "k")
    token0 = int(ds.token.values[0]) if ds.sizes["token"] else 0
    best, where_token, where_dim = _accumulate(
        ds, [ds.topk_ids, out], _max_abs_step,
        [((L, E), np.float64, -np.inf), ((L, E), np.int64, -1), ((L, E), np.int64, -1)], params=(token0,),
        merge=_later_max)
    best = np.where(np.isfinite(best), best, np.nan)
    seen = best[np.isfinite(best)]
    threshold = max(np.quantile(seen, quantile), ratio * seen.max()) if seen.size else np.nan
    dims = ("layer", "expert")
    res = xr.Dataset(
        {"max_abs": (dims, best, {"definition": "max |experts.out| over the tokens routed to the expert"}),
         "token": (dims, where_token, {"definition": "token position of that maximum (-1: never routed)"}),
         "hidden": (dims, where_dim, {"definition": "hidden dimension of that maximum"}),
         "super": (dims, best > threshold, {"definition": f"max_abs > max(quantile {quantile}, {ratio} x largest)"})},
        coords={"layer": ds.layer.values, "expert": np.arange(E)})
    return _finish(res, ds, metric="super experts", threshold=float(threshold))
