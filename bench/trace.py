"""Long-trace benchmark: stream the routing of N random tokens, plus `layers.{L}.resid_post` over one
4096-token window, to a zarr store, against the same chunked forward with no hooks in the same run.

    .venv/bin/python bench/trace.py [--tokens 1000000] [--model DIR] [--chunk-tokens 8192] [--threads T] [--repeat R]

Prints wall time (best of R alternating runs), tokens/s and peak RSS of both, the trace's overhead over the plain forward, and the
store's bytes on disk per routing entry (token, layer, k). A full-attention model (the embedded MLA model)
costs time quadratic in the sequence length, so pick --tokens to suit it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import workbench as wb
from workbench.store import disk_bytes, open_store, trace

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-random-deepseek-v3"
WINDOW = 4096


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def plain_forward(model, ids: np.ndarray, chunk: int) -> float:
    """Seconds for the chunk-by-chunk forward over `ids` with no hooks (what `trace` runs, minus recording)."""
    t0 = time.perf_counter()
    state = wb.State()
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            model(torch.from_numpy(ids[s:s + chunk])[None], cache=state)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--layer", type=int, help="layer of the recorded resid_post window (default: the last)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="alternate both runs R times and keep the best of each")
    ap.add_argument("--out", help="store directory to keep (default: a temporary one)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = wb.load(args.model)
    n, chunk = args.tokens, args.chunk_tokens
    ids = np.random.default_rng(args.seed).integers(0, model.vocab_size, n)
    layer = args.layer if args.layer is not None else max(int(i) for i in model.layers)
    start = max(0, n // 2 - WINDOW // 2)
    window = (start, min(n, start + WINDOW))
    plain_forward(model, ids[:min(n, 256)], chunk)  # warm-up: one-time initialisation out of both timings
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "trace.zarr"
        t_plain = t_trace = float("inf")
        for _ in range(args.repeat):
            t_plain = min(t_plain, plain_forward(model, ids, chunk))
            rss_plain = peak_rss_mb()
            t0 = time.perf_counter()
            trace(model, ids, out, names=[f"layers.{layer}.resid_post"], windows=[window], chunk_tokens=chunk,
                  overwrite=True, progress=False, seed=args.seed)
            t_trace = min(t_trace, time.perf_counter() - t0)
            rss_trace = peak_rss_mb()
        ds = open_store(out)
        s, resid = ds.attrs["summary"], disk_bytes(out / "resid_post")
    print(f"{model.config.get('model_type')} ({args.model}): {len(model.layers)} layers, {s['routed_layers']} routed, "
          f"k={s['k']}; {n:,} random tokens in chunks of {chunk:,}; {torch.get_num_threads()} threads")
    print(f"{'run':28s} {'wall s':>9s} {'tokens/s':>10s} {'peak RSS MB':>12s}")
    print(f"{'forward, no hooks':28s} {t_plain:9.2f} {n / t_plain:10.0f} {rss_plain:12.0f}")
    print(f"{'trace (routing + window)':28s} {t_trace:9.2f} {n / t_trace:10.0f} {rss_trace:12.0f}")
    print(f"trace overhead vs forward: {t_trace / t_plain - 1:+.1%}")
    print(f"store: {s['bytes_on_disk'] / 1e6:.2f} MB on disk; routing {s['routing_bytes'] / 1e6:.2f} MB = "
          f"{s['bytes_per_routing_entry']:.3f} bytes per (token, layer, k) entry (int16 id + float16 weight, "
          f"4 bytes raw); layers.{layer}.resid_post over tokens {window[0]:,}-{window[1]:,}: {resid / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
