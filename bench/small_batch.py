"""Small batches at memory speed: the forward of a 1-32 token prompt reads weights, so its limit is memory
bandwidth, not FLOP/s.

For bench/forward.py's random DeepSeek-V3-style checkpoint (fp32) and each T in --tokens, one T-token forward,
best of --repeat in rounds that run each contender in turn: transformers (its experts implementations; the
faster is the peer) and workbench's `grouped` and `torch` backends. Each time is turned into the bandwidth at
which the forward reads the weights it needs: every parameter but the embedding and the routed experts, the T
embedding rows, and each routed expert that at least one token chose (its three matrices once), against this
machine's measured copy bandwidth (bytes read + written, as bench/analysis.py). For the `grouped` forward it
also times its matmuls alone, each replayed at its own shape after evicting the caches: the rest of the
forward's time is work that no faster matmul removes, which bounds the fraction of the copy bandwidth the
forward can reach.

    .venv/bin/python bench/small_batch.py [--tokens 1 8 32] [--repeat 20] [--family deepseek_v3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from forward import CONFIGS, HF_EXPERTS, best_times, matmul_bound, random_checkpoint

import workbench as wb


def copy_bandwidth(repeat: int = 5) -> float:
    """Bytes per second of a torch copy of 256 MiB (read + write counted)."""
    src = torch.ones(1 << 26)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def bytes_needed(model: wb.models.base.CausalLM, ids: torch.Tensor) -> tuple[int, int]:
    """(bytes of weights the forward of `ids` must read, of which routed experts): every parameter but the
    embedding and routed experts, the embedding rows of the tokens, and the chosen routed experts once each."""
    _, cache = model.run_with_cache(ids, names=["layers.*.router.topk_ids"])
    total = experts = 0
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            total += p[0].nbytes * ids.numel()
        elif ".experts." not in name:
            total += p.nbytes
    for name, chosen in cache.items():
        layer = model.layers[name.split(".")[1]].ffn.experts
        per_expert = sum(getattr(layer, proj)[0].nbytes for proj in layer.PROJECTIONS)
        experts += per_expert * len(chosen.unique())
    return total + experts, experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["deepseek_v3", "mixtral"], default="deepseek_v3")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = CONFIGS[args.family]()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        hf = random_checkpoint(cfg, tmp)
        ours = {b: wb.load(Path(tmp), dtype=torch.float32, backend=b) for b in ("grouped", "torch")}
        bandwidth = copy_bandwidth()
        print(f"{args.family}: {sum(p.numel() for p in ours['grouped'].parameters()) / 1e6:.0f}M params, fp32, "
              f"{torch.get_num_threads()} threads; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
        print(f"{'T':>3s} {'run':28s} {'ms':>7s} {'vs peer':>8s} {'GB/s':>6s} {'of copy':>8s}  weights read")
        for T in args.tokens:
            ids = torch.randint(0, cfg.vocab_size, (1, T))
            need, experts = bytes_needed(ours["grouped"], ids)
            runs = {}
            for impl in HF_EXPERTS:
                runs[f"transformers ({impl})"] = lambda impl=impl: (hf.set_experts_implementation(impl), hf(ids))
            runs.update({f"workbench {b}": lambda m=m: m(ids) for b, m in ours.items()})
            times = best_times(runs, args.repeat)
            peer = min((k for k in times if k.startswith("transformers")), key=times.get)
            for k, t in times.items():
                label = k + (": peer" if k == peer else "")
                print(f"{T:3d} {label:28s} {t * 1e3:7.2f} {times[peer] / t:7.2f}x {need / t / 1e9:6.1f} "
                      f"{need / t / bandwidth:7.1%}  {need / 1e6:.1f} MB ({experts / 1e6:.1f} MB routed experts)")
            matmuls, calls = matmul_bound(lambda: ours["grouped"](ids), 5, cold=True)
            rest = max(0.0, times["workbench grouped"] - matmuls)
            print(f"{'':3s} grouped: its {calls} matmuls alone {matmuls * 1e3:.2f} ms (each replayed at its shape, "
                  f"caches evicted first: {need / matmuls / 1e9:.1f} GB/s), "
                  f"everything else {rest * 1e3:.2f} ms; with every matmul at the copy bandwidth and the rest as it "
                  f"is, the forward would reach {need / (need / bandwidth + rest) / bandwidth:.1%} of it")


if __name__ == "__main__":
    main()
