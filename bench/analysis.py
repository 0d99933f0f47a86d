"""Routing-analysis benchmark: expert load, co-activation (both modes) and consecutive repetition over a store,
in routing entries (token x layer x k) per second, against a straightforward vectorised numpy implementation of
the same metric measured in the same run, and against a memory-bandwidth roofline (a numpy copy of a large
array; an int16 entry is read once, so the roofline is bandwidth / 2 bytes).

    .venv/bin/python bench/analysis.py [--store STORE | --uniform N] [--tokens 131072] [--repeat 3] [--cluster N]

Without --store it first traces --tokens random tokens of the embedded model into a temporary store; --uniform N
instead writes N tokens of uniform random routing (6 layers, 32 experts, top-4) in the layout and chunking
`trace` uses, for sizes that take too long to trace on a small machine. Rows:
`store` runs the analysis on `open_store(STORE)` end to end (reading and decompressing chunk by chunk included);
`memory` runs it on the same routing already in RAM (the kernels alone); `numpy` is the peer on the array in RAM,
and `numpy + read` adds reading the whole array through xarray/dask first, as a user would without this module.
`--cluster N` adds `cluster xN`: the `store` run with the client of a dask LocalCluster of N single-threaded worker
processes current, so that each worker reads and counts its share of the store's chunks (after one untimed run,
in which the workers import the package and load the kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch

import workbench as wb
from workbench import analysis
from workbench.demo import EMBEDDED_MODEL


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """(best wall seconds, last result) of `repeat` calls."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


@contextlib.contextmanager
def local_cluster(workers: int) -> Iterator[Any]:
    """The client of a LocalCluster of `workers` single-threaded worker processes, not made the default: analyses
    use it only inside `client.as_current()`."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster, set_as_default=False) as client:
        yield client


def bandwidth(repeat: int) -> float:
    """Bytes per second of a numpy copy of 256 MiB (read + write counted)."""
    src = np.ones(1 << 27, np.int16)
    dst = np.empty_like(src)
    t, _ = best_of(lambda: np.copyto(dst, src), repeat)
    return 2 * src.nbytes / t


# ---------------------------------------------------------------- the numpy peer: same metrics, vectorised


def numpy_load(ids: np.ndarray, E: int) -> np.ndarray:
    return np.stack([np.bincount(layer.ravel(), minlength=E) for layer in ids])


def numpy_pairs(ids: np.ndarray, E: int, adjacent: bool) -> np.ndarray:
    k = ids.shape[-1]
    ranks = [(s, s + 1) for s in range(k - 1)] if adjacent else list(itertools.combinations(range(k), 2))
    out = np.zeros((ids.shape[0], E, E), np.int64)
    for li, layer in enumerate(ids):
        a = layer.astype(np.int64)
        codes = np.concatenate([a[:, s] * E + a[:, r] for s, r in ranks])
        m = np.bincount(codes, minlength=E * E).reshape(E, E)
        out[li] = m + m.T
    return out


def numpy_repetition(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first = (ids[:, 1:, 0] == ids[:, :-1, 0]).mean(-1)
    second = (ids[:, 1:, :2, None] == ids[:, :-1, None, :2]).any((-1, -2)).mean(-1)
    return first, second


def uniform_store(path: Path, n: int, chunk: int, layers: int = 6, experts: int = 32, k: int = 4) -> None:
    """A store holding n tokens of uniform random routing, laid out, chunked and compressed as `trace` does."""
    import zarr
    from zarr.codecs import BloscCodec

    rng = np.random.default_rng(0)
    codec = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    root = zarr.create_group(path, zarr_format=3, attributes={
        "workbench_store": 1, "committed_tokens": n, "complete": True, "n_experts": experts, "k": k,
        "routed_layers": list(range(layers))})
    root.create_array("layer", data=np.arange(layers), dimension_names=("layer",))
    for name, dtype, values in (("token", np.int64, np.arange(n)), ("input_ids", np.int32, rng.integers(0, 256, n))):
        root.create_array(name, shape=(n,), chunks=(chunk,), dtype=dtype, compressors=codec,
                          dimension_names=("token",))[:] = values
    ids = root.create_array("topk_ids", shape=(layers, n, k), chunks=(layers, chunk, k), dtype=np.int16,
                            fill_value=-1, compressors=codec, dimension_names=("layer", "token", "k"))
    for s in range(0, n, 1 << 16):
        e = min(n, s + (1 << 16))
        ids[:, s:e] = np.argsort(rng.random((layers, e - s, experts), np.float32), -1)[..., :k].astype(np.int16)
    print(f"wrote {n:,} tokens of uniform random routing to a store")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", help="a store written by `workbench trace` (default: trace --tokens first)")
    ap.add_argument("--tokens", type=int, default=131072, help="random tokens to trace without --store")
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--uniform", type=int, help="write N tokens of uniform random routing instead of tracing")
    ap.add_argument("--repeat", type=int, default=3, help="best of R runs per row")
    ap.add_argument("--cluster", type=int, default=0, metavar="N",
                    help="also run over the store on a dask LocalCluster of N single-threaded worker processes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.store) if args.store else Path(tmp) / "bench.zarr"
        if args.uniform:
            uniform_store(path, args.uniform, args.chunk_tokens)
        elif not args.store:
            model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
            ids = np.random.default_rng(0).integers(0, model.vocab_size, args.tokens)
            t0 = time.perf_counter()
            model.trace(ids, path, chunk_tokens=args.chunk_tokens, progress=False, seed=0)
            print(f"traced {args.tokens:,} random tokens of {EMBEDDED_MODEL.name} in {time.perf_counter() - t0:.1f} s")
        with local_cluster(args.cluster) if args.cluster else contextlib.nullcontext() as client:
            run(path, args.repeat, client)


def run(path: Path, repeat: int, client: Any = None) -> None:
    ds = wb.open_store(path)
    ds = ds[["input_ids", "topk_ids"]].sel(layer=ds.attrs["routed_layers"])  # what the benchmarked metrics read
    E, (L, T, k) = ds.attrs["n_experts"], ds.topk_ids.shape
    entries = L * T * k
    mem = ds.compute()
    ids = mem.topk_ids.values
    bw = bandwidth(repeat)
    roof = bw / ids.dtype.itemsize
    print(f"store {path}: {T:,} tokens x {L} routed layers x k={k} = {entries:,} routing entries, E={E}; "
          f"chunks {ds.topk_ids.data.chunksize}; numba threads {numba.get_num_threads()}, "
          f"{os.cpu_count()} cores")
    print(f"memory bandwidth (numpy copy): {bw / 1e9:.1f} GB/s -> roofline {roof / 1e6:,.0f} M entries/s\n")
    metrics = {
        "load": (lambda d: analysis.expert_load(d).counts.values, lambda a: numpy_load(a, E)),
        "co-activation all_pairs": (lambda d: analysis.coactivation(d).pairs.values,
                                    lambda a: numpy_pairs(a, E, adjacent=False)),
        "co-activation adjacent_ranks": (lambda d: analysis.coactivation(d, "adjacent_ranks").pairs.values,
                                         lambda a: numpy_pairs(a, E, adjacent=True)),
        "repetition": (lambda d: (lambda r: (r["first"].values, r.first_or_second.values))(analysis.repetition(d)),
                       numpy_repetition),
    }
    runs = [("store", ds, None), ("memory", mem, None)]
    if client is not None:
        runs.insert(1, (f"cluster x{len(client.nthreads())}", ds, client))
    print(f"{'metric':30s} {'run':14s} {'seconds':>9s} {'M entries/s':>12s} {'vs numpy':>9s} {'of roofline':>12s}")
    for name, (ours, peer) in metrics.items():
        ours(mem.isel(token=slice(0, 1000)))  # compile (or load the cached kernels) outside the timings
        t_peer, want = best_of(lambda: peer(ids), repeat)
        t_read, _ = best_of(lambda: peer(wb.open_store(path).topk_ids.sel(layer=ds.layer.values).values), repeat)
        rows = []
        for label, data, on in runs:
            with on.as_current() if on else contextlib.nullcontext():
                if on:
                    ours(data)  # the workers' first run imports the package and loads the kernels
                t, got = best_of(lambda: ours(data), repeat)
            for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                np.testing.assert_allclose(g, w, err_msg=f"{name} ({label}) differs from the numpy peer")
            rows.append((label, t))
        rows += [("numpy", t_peer), ("numpy + read", t_read)]
        for label, t in rows:
            rate = entries / t
            print(f"{name:30s} {label:14s} {t:9.3f} {rate / 1e6:12,.0f} {t_peer / t:8.2f}x {rate / roof:11.1%}")
        print()


if __name__ == "__main__":
    main()
