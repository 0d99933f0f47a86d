"""The few-row streaming kernel alone against the copy bandwidth: the kernel calls of one T-token forward,
replayed with cold caches.

bench/small_batch.py times whole forwards; this isolates their weight-streaming kernel
(`workbench.models.stream_jit.kernel`). For bench/forward.py's DeepSeek-V3-style checkpoint (fp32) and each T in
--tokens, it records the kernel's calls in one forward, then for --seconds replays them back to back in rounds
that also run a 256 MiB copy, each call sequence and the copy after a cache eviction, each round starting one
contender later; before its eviction each sequence runs its first call untimed, so that every contender starts
with the kernel's threads awake, as in a forward (one that follows a copy would pay their wake-up). This
machine's memory bandwidth flips between states every few minutes, so each round keeps its copy's rate and
rounds are reported by state: the replay's read rate (bytes of the weights the calls read) as a fraction of that
state's copy, overall and for the routed experts, the dense projections and the LM head. A second limit runs in
the same rounds: a plain read (a sum) of the same weight rows, split into the kernel's work items, which is what
this access pattern (many experts' blocks, CHUNK rows at a time) reaches with no arithmetic.

--against FILE... adds other versions of `stream_jit.py` (say, one saved from an earlier commit) as contenders:
their outputs are checked against the forward's, bit for bit, and each one's time is reported as a ratio to the
current kernel's in the same rounds (all then compiled afresh from copies, loaded alike), beside a control: the
current kernel compiled a second time, whose ratio shows what a ratio of equals reads (here it came out 0.94-0.99:
compare others with it, not with 1).

    .venv/bin/python bench/kernel_replay.py [--tokens 1 8 32] [--seconds 30] [--against old_stream_jit.py ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch
from forward import CONFIGS, evict, kernel_call_work, random_checkpoint, streaming_kernel

import workbench as wb
from workbench.models import stream
from workbench.models.stream_jit import CHUNK

CONTROL = "control (the current kernel again)"  # its ratio to the current's shows how far apart equals measure
FAST = 60e9  # copy rates above this (bytes/s, read + written) count as the fast state; the slow one is about 46 GB/s


def record(model: wb.models.base.CausalLM, ids: torch.Tensor) -> tuple[list[tuple], list[tuple]]:
    """The streaming kernel's calls in one forward of `ids`: their arguments (index and input arrays copied, as
    the forward goes on to reuse its buffers; the weights as they are; fresh NaN-filled outputs) and what each
    call wrote (NaN where it writes nothing: the rows of experts that run as matmuls, padding)."""
    calls, outputs = [], []

    def recording(kernel):
        def recorded(*args):
            for out in args[-1]:
                out.fill(np.nan)
            kernel(*args)
            calls.append(tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args[:-1])
                         + (tuple(np.full_like(o, np.nan) for o in args[-1]),))
            outputs.append(tuple(o.copy() for o in args[-1]))
        return recorded

    with streaming_kernel(recording):
        model(ids)
    return calls, outputs


@numba.njit(parallel=True, fastmath=True)
def read_rows(x, rows, experts, begin, end, fmt, wf, wq, sf, sq, bo, bi, fp8, fp4, e8m0, outs):  # pragma: no cover
    """The sum of the fp32 weight rows a kernel call reads, over the kernel's work items (projection, expert, CHUNK
    rows) in its order: the same bytes through the same split, without the dots."""
    widest = 0
    for proj in range(len(outs)):
        widest = max(widest, wf[proj].shape[1])
    chunks = (widest + CHUNK - 1) // CHUNK
    per_proj = len(experts) * chunks
    sums = np.zeros(len(outs) * per_proj, np.float32)
    for item in numba.prange(len(outs) * per_proj):
        proj, j, chunk = item // per_proj, item % per_proj // chunks, item % chunks
        w, e, s = wf[proj], experts[j], np.float32(0.0)
        for r in range(chunk * CHUNK, min((chunk + 1) * CHUNK, w.shape[1])):
            row = w[e, r]
            for c in range(row.shape[0]):
                s += row[c]
        sums[item] = s
    return sums.sum()


def kind(args: tuple) -> str:
    """Which weights a call reads: routed experts (several listed), the LM head (the widest), or dense ones."""
    wf = args[6]
    return "routed" if len(args[2]) > 1 else ("LM head" if wf[0].shape[1] >= 4096 else "dense")


def load_kernel(path: Path, folder: str, name: str):
    """The `kernel` of a version of stream_jit.py, copied into `folder` as module `name` and imported from there
    (compiled afresh: numba caches by file, and the installed module's cache is not reused)."""
    copy = Path(folder) / f"{name}.py"
    shutil.copy(path, copy)
    spec = importlib.util.spec_from_file_location(name, copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=30.0, help="of rounds per T")
    ap.add_argument("--against", type=Path, nargs="+", default=[],
                    help="other versions of stream_jit.py whose kernels to time in the same rounds")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = CONFIGS["deepseek_v3"]()
    src = torch.ones(1 << 26)
    dst = torch.empty_like(src)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as copies, torch.no_grad():
        random_checkpoint(cfg, tmp)
        model = wb.load(Path(tmp), dtype=torch.float32, backend="grouped")
        if args.against:  # all loaded the same way, so that none gains from how it was imported
            current = Path(stream._jit().__file__)
            kernels = {"current": load_kernel(current, copies, "stream_jit_current"),
                       CONTROL: load_kernel(current, copies, "stream_jit_control")}
            for n, path in enumerate(args.against):
                kernels[str(path)] = load_kernel(path, copies, f"stream_jit_against{n}")
        else:
            kernels = {"current": stream._jit().kernel}
        for T in args.tokens:
            calls, want = record(model, torch.randint(0, cfg.vocab_size, (1, T)))
            for name, kernel in kernels.items():  # compiled and checked before timing
                for c, w in zip(calls, want):
                    kernel(*c)
                    if not all(np.array_equal(o, v, equal_nan=True) for o, v in zip(c[-1], w)):
                        raise SystemExit(f"{name}'s outputs differ from the forward's at T={T}")
            call_kinds = [kind(c) for c in calls]
            kinds = sorted(set(call_kinds))
            nbytes = dict.fromkeys(kinds, 0)
            for c, k in zip(calls, call_kinds):
                nbytes[k] += kernel_call_work(c)[0]
            total = sum(nbytes.values())
            names = ["copy", "read", *kernels]
            contenders = {"read": read_rows, **kernels}
            read_rows(*calls[0])  # compiled before timing
            rounds, r, stop = [], 0, time.time() + args.seconds
            while time.time() < stop:
                row = {}
                for name in names[r % len(names):] + names[:r % len(names)]:
                    if name != "copy":  # as in a forward, the kernel's threads have just run (not slept since a copy)
                        contenders[name](*calls[0])
                    evict()
                    if name == "copy":
                        t0 = time.perf_counter()
                        dst.copy_(src)
                        row[name] = 2 * src.nbytes / (time.perf_counter() - t0)
                        continue
                    spent = dict.fromkeys(kinds, 0.0)
                    for c, k in zip(calls, call_kinds):  # only the call inside its timed interval
                        t0 = time.perf_counter()
                        contenders[name](*c)
                        t1 = time.perf_counter()
                        spent[k] += t1 - t0
                    row[name] = spent
                rounds.append(row)
                r += 1
            print(f"T={T}: {len(calls)} kernel calls reading {total / 1e6:.1f} MB "
                  f"({', '.join(f'{k} {b / 1e6:.1f} MB' for k, b in nbytes.items())}), {len(rounds)} rounds")
            for state, chosen in (("slow", [x for x in rounds if x["copy"] <= FAST]),
                                  ("fast", [x for x in rounds if x["copy"] > FAST])):
                if not chosen:
                    print(f"  {state} state: no rounds")
                    continue
                copy = float(np.median([x["copy"] for x in chosen]))
                times = np.array([sum(x["current"].values()) for x in chosen])
                print(f"  {state} state, {len(chosen)} rounds, copy {copy / 1e9:.1f} GB/s (median): the calls take "
                      f"{np.median(times) * 1e3:.2f} ms median, {times.min() * 1e3:.2f} best: "
                      f"{total / np.median(times) / copy:.1%} of copy (median), "
                      f"{total / np.median(times) / 1e9:.1f} GB/s; by kind (median): " + ", ".join(
                          f"{k} {nbytes[k] / np.median([x['current'][k] for x in chosen]) / 1e9:.1f} GB/s"
                          for k in kinds))
                read = np.median([sum(x["read"].values()) for x in chosen])
                print(f"    a plain read of the same rows, split alike: {total / read / 1e9:.1f} GB/s "
                      f"({total / read / copy:.1%} of copy; by kind: " + ", ".join(
                          f"{k} {nbytes[k] / np.median([x['read'][k] for x in chosen]) / 1e9:.1f} GB/s" for k in kinds)
                      + f"); the kernel takes {np.median(times) / read:.2f}x its time")
                for name in list(kernels)[1:]:
                    ratio = np.array([sum(x[name].values()) for x in chosen]) / times
                    print(f"    {name}: {np.median(ratio):.3f}x the current kernel's time (median of the rounds' "
                          f"ratios; same bits)")


if __name__ == "__main__":
    main()
