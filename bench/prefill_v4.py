"""Prefill of the embedded DeepSeek-V4 model: one --tokens forward in the checkpoint's bf16 and in fp32.

Each is timed best of --repeat, in rounds that run both in turn, against two limits measured in the same run: the
matmul roofline in its dtype (FLOPs as bench/trace.py counts them: active parameters, attention, CSA indexer) and
its matmuls alone, each replayed at its own shape. Then torch's profiler names the largest costs of the bf16
forward, so the work beside the matmuls (hyper-connections' Sinkhorn, norms, the indexer's scan) shows.

    .venv/bin/python bench/prefill_v4.py [--tokens 2048] [--repeat 5]
"""

from __future__ import annotations

import argparse

import torch
from forward import best_times, matmul_bound
from trace import flops_per_sequence, matmul_flops

import workbench as wb
from workbench.demo import EMBEDDED_MODEL

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    models = {"bf16": wb.load(EMBEDDED_MODEL), "fp32": wb.load(EMBEDDED_MODEL, dtype=torch.float32)}
    ids = torch.randint(0, models["bf16"].vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    flops = sum(flops_per_sequence(models["bf16"], args.tokens).values())
    with torch.no_grad():
        times = best_times({name: lambda m=m: m(ids) for name, m in models.items()}, args.repeat)
        peaks = {"bf16": matmul_flops(torch.bfloat16), "fp32": matmul_flops()}
        bounds = {name: matmul_bound(lambda m=m: m(ids), args.repeat)[0] for name, m in models.items()}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            models["bf16"](ids)
    print(f"embedded V4 ({EMBEDDED_MODEL.name}), {args.tokens} tokens, {flops / 1e9:.1f} GFLOP, "
          f"{torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"{name}: {t * 1e3:.0f} ms ({args.tokens / t:,.0f} tokens/s), {flops / t / peaks[name]:.1%} of the "
              f"measured {peaks[name] / 1e9:.0f} GFLOP/s {name} matmul; its matmuls alone at their shapes "
              f"{bounds[name] * 1e3:.0f} ms ({bounds[name] / t:.1%} of the forward)")
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print("bf16 forward under the profiler, largest self times:")
    for e in events[:12]:
        kind = "matmul" if e.key in MATMUL_OPS else ""
        print(f"  {e.key:55s} {e.self_cpu_time_total / 1e3:8.1f} ms {e.self_cpu_time_total / total:6.1%} "
              f"{e.count:6d} calls {kind}")


if __name__ == "__main__":
    main()
