"""Long-trace benchmark: one sequence of N random tokens through the embedded model, with default settings (the
checkpoint's dtype, 8,192-token chunks), all routing recorded plus every layer's `experts.out` over one
4096-token window, streamed to a zarr store by the real CLI command.

    .venv/bin/python bench/trace.py [--tokens 1000000] [--model DIR] [--chunk-tokens 8192] [--dtype D]
                                    [--out STORE] [--overhead-tokens 65536] [--repeat 3]

1. Overheads, in this process, over the first --overhead-tokens tokens, alternating R times, best of each: the
   chunked forward with no hooks, the trace of routing alone, and the trace of routing plus the window.
2. The long run: `workbench trace` in a child process under `/usr/bin/time -v` (wall time, peak RSS), then
   the store's bytes per (token, layer, k) routing entry, and a lazy read of one layer's routing over a
   4096-token slice (`ds.topk_ids.sel(layer=L).isel(token=slice(a, b))`) against reading the whole array.
3. A roofline for the run: the FLOPs a token costs (matmuls of the active parameters plus the CSA indexer's
   scoring against every earlier pooled entry) against this machine's measured matmul FLOP/s in the run's dtype.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import workbench as wb
from workbench.demo import EMBEDDED_MODEL
from workbench.store import open_store, trace

WINDOW = 4096
NAMES = "layers.*.experts.out"  # every expert's output for each token it serves: [tokens, k, hidden] per layer


def plain_forward(model, ids: np.ndarray, chunk: int) -> float:
    """Seconds for the chunk-by-chunk forward over `ids` with no hooks (what `trace` runs, minus recording)."""
    t0 = time.perf_counter()
    state = wb.State()
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            model(torch.from_numpy(ids[s:s + chunk])[None], cache=state)
    return time.perf_counter() - t0


def overhead(model, ids: np.ndarray, chunk: int, repeat: int, tmp: Path) -> dict[str, float]:
    """Best-of-R seconds over `ids` of the plain forward, the routing trace, and the routing trace plus
    `experts.out` on a 4096-token window in the middle, run in turn R times."""
    start = max(0, len(ids) // 2 - WINDOW // 2)
    window = (start, min(len(ids), start + WINDOW))
    best = {"forward": float("inf"), "routing": float("inf"), "routing + window": float("inf")}
    for _ in range(repeat):
        best["forward"] = min(best["forward"], plain_forward(model, ids, chunk))
        for run, names in (("routing", []), ("routing + window", [NAMES])):
            t0 = time.perf_counter()
            trace(model, ids, tmp / "overhead.zarr", names=names, windows=[window] if names else None,
                  chunk_tokens=chunk, overwrite=True, progress=False)
            best[run] = min(best[run], time.perf_counter() - t0)
    return best


def cpu_name() -> str:
    """The CPU's model name (timings hold for this CPU only: bf16 matmul units differ between machines)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")


def matmul_flops(dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul FLOP/s in `dtype` (2048^3, best of 5)."""
    a = torch.randn(2048, 2048).to(dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def flops_per_sequence(model, n: int) -> dict[str, float]:
    """FLOPs one n-token sequence costs, by part: matmuls of the active parameters, attention (sliding window
    in every layer, plus each CSA query's index_topk entries and every complete HCA entry), and the CSA
    indexer's scoring of every complete pooled entry."""
    cfg = model.config
    H, I, L = cfg.int("hidden_size"), cfg.int("moe_intermediate_size"), cfg.int("num_hidden_layers")
    active = sum(p.numel() for name, p in model.named_parameters()
                 if ".experts." not in name and not name.startswith("embed") and p.dim() == 2)
    active += L * cfg.int("num_experts_per_tok") * 3 * H * I
    kinds = cfg.get("layer_types", [])
    rates = cfg.get("compress_rates") or {}
    csa, hca = kinds.count("compressed_sparse_attention"), kinds.count("heavily_compressed_attention")
    m_csa, m_hca = rates.get("compressed_sparse_attention", 4), rates.get("heavily_compressed_attention", 128)
    per_key = 4 * cfg.int("num_attention_heads") * cfg.int("head_dim")  # q.k and p.v, multiply-adds
    window = min(n, cfg.int("sliding_window"))
    attention = per_key * n * (L * window + csa * cfg.int("index_topk")) + per_key * hca * n * n / (2 * m_hca)
    indexer = csa * 2 * cfg.int("index_n_heads") * cfg.int("index_head_dim") * n * n / (2 * m_csa)
    return {"parameters": 2 * active * n, "attention": attention, "indexer": indexer}


def timed_cli(args: argparse.Namespace, out: Path, window: tuple[int, int], tmp: Path) -> dict:
    """Run `workbench trace` under /usr/bin/time -v; its wall time (s) and peak RSS (bytes)."""
    report = tmp / "time.txt"
    cmd = [sys.executable, "-m", "workbench", "trace", args.model, "--random-tokens", str(args.tokens),
           "--seed", str(args.seed), "--names", NAMES, "--window", f"{window[0]}:{window[1]}",
           "--chunk-tokens", str(args.chunk_tokens), "--out", str(out), "--overwrite"]
    cmd += ["--dtype", args.dtype] if args.dtype else []
    print("$", " ".join(cmd), flush=True)
    subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *cmd], check=True)
    text = report.read_text()
    h, m, s = ([0] + [float(x) for x in re.search(r"Elapsed .*: ([\d:.]+)", text).group(1).split(":")])[-3:]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    return {"wall_s": 3600 * h + 60 * m + s, "peak_rss": rss}


def lazy_read(out: Path, layer: int, n: int) -> tuple[float, float]:
    """Seconds to read one layer's routing over a 4096-token slice, and over the whole sequence."""
    ds = open_store(out)
    ds.topk_ids.sel(layer=layer).isel(token=slice(0, 16)).values  # warm-up: the process's first read imports codecs
    a = n // 3
    t0 = time.perf_counter()
    part = ds.topk_ids.sel(layer=layer).isel(token=slice(a, a + WINDOW)).values
    t_part = time.perf_counter() - t0
    assert part.shape[0] == min(WINDOW, n - a)
    t0 = time.perf_counter()
    ds.topk_ids.sel(layer=layer).values
    return t_part, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(EMBEDDED_MODEL))
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--chunk-tokens", type=int, default=8192, help="as `workbench trace`'s default")
    ap.add_argument("--dtype", help="compute dtype (default: the checkpoint's, as `workbench trace`)")
    ap.add_argument("--layer", type=int, help="layer of the lazy-read check (default: the last)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overhead-tokens", type=int, default=65536, help="prefix timed with and without the trace")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of the overhead measurement")
    ap.add_argument("--out", help="store directory to keep (default: a temporary one)")
    args = ap.parse_args()
    model = wb.load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    dtype = next(model.parameters()).dtype
    n, chunk = args.tokens, args.chunk_tokens
    layer = args.layer if args.layer is not None else max(int(i) for i in model.layers)
    ids = np.random.default_rng(args.seed).integers(0, model.vocab_size, n)
    start = max(0, n // 2 - WINDOW // 2)
    window = (start, min(n, start + WINDOW))
    print(f"{model.config.get('model_type')} ({args.model}), {dtype}, {torch.get_num_threads()} threads; "
          f"chunks of {chunk:,} tokens; CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefix = ids[:min(n, args.overhead_tokens)]
        plain_forward(model, prefix[:256], chunk)  # warm-up: one-time initialisation out of both timings
        t = overhead(model, prefix, chunk, args.repeat, tmp)
        print(f"over the first {len(prefix):,} tokens (best of {args.repeat}, in turn): forward {t['forward']:.2f} s; "
              f"routing trace {t['routing']:.2f} s ({t['routing'] / t['forward'] - 1:+.1%} over the forward, goal "
              f"3%); routing + {NAMES} on {WINDOW:,} tokens {t['routing + window']:.2f} s "
              f"({t['routing + window'] / t['routing'] - 1:+.1%} over routing alone, goal 5%)", flush=True)
        out = Path(args.out) if args.out else tmp / "trace.zarr"
        run = timed_cli(args, out, window, tmp)
        s = open_store(out).attrs["summary"]
        t_part, t_all = lazy_read(out, layer, n)
    peak, peak_dtype = matmul_flops(), matmul_flops(dtype)
    parts = flops_per_sequence(model, n)
    floor = sum(parts.values()) / peak_dtype
    print(f"\n{n:,} tokens: wall {run['wall_s']:.0f} s ({n / run['wall_s']:,.0f} tokens/s), peak RSS "
          f"{run['peak_rss'] / 2**30:.2f} GiB (/usr/bin/time -v)")
    print(f"store: {s['bytes_on_disk'] / 1e6:.1f} MB on disk; routing {s['routing_bytes'] / 1e6:.1f} MB = "
          f"{s['bytes_per_routing_entry']:.3f} bytes per (token, layer, k) entry over {s['routed_layers']} layers, "
          f"k={s['k']} (int16 id + float16 weight = 4 bytes raw)")
    print(f"lazy read: layer {layer} routing over {WINDOW:,} tokens in {t_part * 1e3:.1f} ms; "
          f"the whole layer in {t_all * 1e3:.0f} ms")
    print(f"wall time against the goal (7 min): {run['wall_s'] / 420:.2f}x")
    print("roofline: " + " + ".join(f"{v / 1e12:.1f} TFLOP {k}" for k, v in parts.items()) +
          f" at the measured {peak_dtype / 1e9:.0f} GFLOP/s {dtype} matmul (the indexer's matmul runs in the "
          f"model's dtype too; the few entries it keeps are rescored exactly) = {floor:.0f} s; the run took "
          f"{run['wall_s'] / floor:.1f}x that (all at the {peak / 1e9:.0f} GFLOP/s sgemm: "
          f"{sum(parts.values()) / peak:.0f} s)")


if __name__ == "__main__":
    main()
