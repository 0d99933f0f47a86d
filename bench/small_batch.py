"""Small batches at memory speed: the forward of a 1-32 token prompt reads weights, so its limit is memory
bandwidth, not FLOP/s.

For bench/forward.py's random DeepSeek-V3-style checkpoint (fp32, or --dtype bfloat16 for every model, as
DeepSeek's checkpoints run by default) and each T in --tokens, one T-token forward,
best of --repeat in rounds that run each contender in turn (each round starting one contender later), with the
caches evicted before each call (a decode step's weights come from memory): transformers (its experts
implementations; the faster is the peer) and workbench's `grouped` and `torch` backends. The limits run in the
same rounds: a 256 MiB copy (bytes read + written, as bench/analysis.py) and a 256 MiB read (a sum). Each time is
turned into the bandwidth at which the forward reads the weights it needs: every parameter but the embedding and
the routed experts, the T embedding rows, and each routed expert that at least one token chose (its three
matrices once).

Bounds on the fraction of the copy bandwidth a forward can reach, all measured in the run:
- the forward's fixed cost: the same architecture with every width at 64 or less (`SKELETON`), timed in the same
  rounds, runs the same ops on next to no weights; with the weights read at the copy bandwidth on top, the
  forward would take at least the sum;
- for the `grouped` forward, its time split into the weight-streaming kernel (`workbench.models.stream`, which
  reads every weight) and everything else (norms, attention, routing, Python): with the kernel at the copy
  bandwidth and the rest as it is, the forward would reach the printed fraction (fp32: the kernel runs fp32);
  and, tighter, with each kernel call taking the longer of its weights at the copy bandwidth and its FLOPs at the
  kernel's best measured rate (`kernel_flop_rate`: at 32 tokens each dense weight value is used 32 times, and
  arithmetic, not memory, bounds such a call);
- both at once: those kernel calls on top of the fixed cost (the forward's other work cut to what the skeleton
  spends);
- under traffic: those kernel calls on top of the fixed cost under the forward's own cache traffic. The weights a
  call streams (up to 40 MB here, more than the last-level cache) evict the code and data of the Python and torch
  ops that follow it, which then run from memory; non-temporal prefetch hints did not keep the cache on this CPU.
  So the skeleton is timed again with the real forward's kernel calls (recorded as `kernel_replay.record` does)
  run right after its own, each in its place, their time taken out. (bench/kernel_replay.py shows how close the
  kernel calls come to the copy bandwidth, and to a plain read of the same rows.)

    .venv/bin/python bench/small_batch.py [--tokens 1 8 32] [--repeat 20] [--family deepseek_v3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from forward import CONFIGS, HF_EXPERTS, best_times, evict, kernel_call_work, random_checkpoint, streaming_kernel
from kernel_replay import record

import workbench as wb
from workbench.models import stream


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


def kernel_share(run, repeat: int) -> tuple[float, float]:
    """(forward seconds, of which in the weight-streaming kernel) of the fastest of `repeat` cold runs."""
    spent = [0.0]

    def timing(kernel):
        def timed(*args):
            t0 = time.perf_counter()
            kernel(*args)
            spent[0] += time.perf_counter() - t0
        return timed

    best = (float("inf"), 0.0)
    with streaming_kernel(timing):  # the weight-reading kernel; the others (activation, sum) are "the rest"
        for _ in range(repeat):
            evict()
            spent[0] = 0.0
            t0 = time.perf_counter()
            run()
            best = min(best, (time.perf_counter() - t0, spent[0]))
    return best


def fixed_cost_under_traffic(skeleton, calls: list[tuple], repeat: int) -> tuple[float, float]:
    """(skeleton seconds, the same under traffic): the skeleton's forward, best of `repeat` cold runs, alone and
    with the real forward's kernel `calls` run right after its own (its i-th call followed by the real i-th: the
    same architecture makes the same calls), their time taken out, in alternating rounds."""
    replay, at, spent = [False], [0], [0.0]

    def then_real(kernel):
        def both(*args):
            kernel(*args)
            if replay[0]:
                t0 = time.perf_counter()
                kernel(*calls[at[0]])
                spent[0] += time.perf_counter() - t0
            at[0] += 1
        return both

    best = {False: float("inf"), True: float("inf")}
    with streaming_kernel(then_real):
        for r in range(2 * repeat):
            replay[0], at[0] = bool(r % 2), 0
            skeleton()  # steady, as the skeleton's other timings
            evict()
            at[0], spent[0] = 0, 0.0
            t0 = time.perf_counter()
            skeleton()
            best[replay[0]] = min(best[replay[0]], time.perf_counter() - t0 - spent[0])
            if at[0] != len(calls):
                raise SystemExit(f"the skeleton made {at[0]} kernel calls, the forward {len(calls)}")
    return best[False], best[True]


def kernel_flop_rate(repeat: int = 200) -> float:
    """The streaming kernel's best FLOP rate: 32 rows against a 256 x 512 weight held in cache (each weight value
    used 32 times, four weight rows against four input rows at a time), the fastest of `repeat` calls."""
    g = torch.Generator().manual_seed(0)  # the global generator's draws (the token ids) stay as without this call
    x, w = torch.randn(32, 512, generator=g), torch.randn(256, 512, generator=g)
    seconds = best_times({"": lambda: stream.linear(x, w)}, repeat)[""]
    return 2 * x.shape[0] * w.numel() / seconds


# the same architecture with every width at 64 or less: its forward runs the same ops on next to no weights, so its
# time is the fixed cost of the forward's op dispatch and Python, which no faster weight reading removes
SKELETON = {
    "deepseek_v3": dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, q_lora_rank=32,
                        kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
    "mixtral": dict(hidden_size=64, intermediate_size=64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["deepseek_v3", "mixtral"], default="deepseek_v3")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="of every model; the streaming kernel runs fp32 only (bf16 runs torch's matmuls)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = CONFIGS[args.family]()
    src = torch.ones(1 << 26)
    dst = torch.empty_like(src)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as tiny, torch.no_grad():
        hf = random_checkpoint(cfg, tmp).to(dtype)
        ours = {b: wb.load(Path(tmp), dtype=dtype, backend=b) for b in ("grouped", "torch")}
        with torch.random.fork_rng():  # the token ids below stay those of runs without the skeleton
            random_checkpoint(type(cfg)(**{**cfg.to_dict(), **SKELETON[args.family]}), tiny)
        skeleton = wb.load(Path(tiny), dtype=dtype)
        print(f"{args.family}: {sum(p.numel() for p in ours['grouped'].parameters()) / 1e6:.0f}M params, {args.dtype}, "
              f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
        print(f"{'T':>3s} {'run':28s} {'ms':>7s} {'vs peer':>8s} {'GB/s':>6s} {'of copy':>8s} {'of read':>8s}  "
              "weights read")
        for T in args.tokens:
            ids = torch.randint(0, cfg.vocab_size, (1, T))
            need, experts = bytes_needed(ours["grouped"], ids)
            runs = {"copy 256 MiB": lambda: dst.copy_(src), "read 256 MiB": lambda: src.sum()}
            for impl in HF_EXPERTS:
                runs[f"transformers ({impl})"] = lambda impl=impl: (hf.set_experts_implementation(impl), hf(ids))
            runs.update({f"workbench {b}": lambda m=m: m(ids) for b, m in ours.items()})
            runs["skeleton"] = lambda: skeleton(ids)
            times = best_times(runs, args.repeat, before=evict, rotate=True, steady=True)
            copy, read = 2 * src.nbytes / times.pop("copy 256 MiB"), src.nbytes / times.pop("read 256 MiB")
            fixed = times.pop("skeleton")
            print(f"{T:3d} limits: copy {copy / 1e9:.1f} GB/s (read + written), read {read / 1e9:.1f} GB/s; the "
                  f"forward's fixed cost {fixed * 1e3:.2f} ms (its ops on a width-64 copy of the model), so with the "
                  f"weights read at the copy bandwidth on top it would reach at most "
                  f"{need / (need / copy + fixed) / copy:.1%} of it")
            peer = min((k for k in times if k.startswith("transformers")), key=times.get)
            for k, t in times.items():
                label = k + (": peer" if k == peer else "")
                print(f"{T:3d} {label:28s} {t * 1e3:7.2f} {times[peer] / t:7.2f}x {need / t / 1e9:6.1f} "
                      f"{need / t / copy:7.1%} {need / t / read:7.1%}  "
                      f"{need / 1e6:.1f} MB ({experts / 1e6:.1f} MB routed experts)")
            calls = record(ours["grouped"], ids)[0]
            if not calls:
                continue
            work = [kernel_call_work(c) for c in calls]  # each call's (bytes, FLOPs), counted outside any timing
            total, kernels = kernel_share(lambda: ours["grouped"](ids), args.repeat)
            rest = total - kernels
            flop_rate = kernel_flop_rate()
            roof = sum(max(nbytes / copy, flops / flop_rate) for nbytes, flops in work)
            calm, busy = fixed_cost_under_traffic(lambda: skeleton(ids), calls, args.repeat)
            print(f"{'':3s} grouped, its fastest cold run ({total * 1e3:.2f} ms): {len(calls)} streaming-kernel calls "
                  f"{kernels * 1e3:.2f} ms (weights at {need / kernels / 1e9:.1f} GB/s), everything else "
                  f"{rest * 1e3:.2f} ms; with the kernels at the copy bandwidth and the rest as it is, the forward "
                  f"would reach {need / (need / copy + rest) / copy:.1%} of it; with each kernel call taking the "
                  f"longer of its weights at the copy bandwidth and its {sum(f for _, f in work) / 1e9:.2f} GFLOP (in "
                  f"all) at the kernel's best rate ({flop_rate / 1e9:.0f} GFLOP/s, weights in cache), "
                  f"{need / (roof + rest) / copy:.1%}; with those kernel calls on top of the fixed cost alone "
                  f"(everything else cut to the skeleton's time), {need / (roof + fixed) / copy:.1%}; under traffic, "
                  f"on top of the fixed cost under the forward's cache traffic (the skeleton with the forward's "
                  f"kernel calls run after its own, their time taken out: {busy * 1e3:.2f} ms against "
                  f"{calm * 1e3:.2f} ms without them in the same rounds), {need / (roof + busy) / copy:.1%}")


if __name__ == "__main__":
    main()
