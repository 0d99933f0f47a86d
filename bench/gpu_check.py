"""GPU check: one command on a single H100 or H200 runs everything that needs the GPU and writes one results file.

    make gpu-check                                   # .venv/bin/python bench/gpu_check.py --out gpu-check.json
    .venv/bin/python bench/gpu_check.py --out results/h100.json [--workers 4] [--tokens 1,16,128,1024,4096]

1. tests/test_kernels.py compiled on the GPU (TRITON_INTERPRET unset; split over --workers pytest processes):
   every kernel against its PyTorch reference in fp32, fp16 and bf16 (FP8 converted by Triton and decoded
   from its bytes, FP4), and the `cuda`-marked tests: each family's tiny checkpoint in bf16 on the `triton`
   backend against `torch`, and the quantised checkpoints (FP8; DeepSeek-V4's FP8 + FP4) against their
   dequantised copies.
2. bench/gpu_moe.py with bf16, FP8 and FP4 experts against torch.nn.functional.grouped_mm and the HBM copy
   roofline, with --check: each y against the baseline run on the weights the kernel read.

Writes one JSON file at --out: the environment, each test's outcome, the benchmark rows and, under "summary",
a short markdown summary (also printed). Exits 1 when a test fails, a `cuda` test did not pass, or a checked
difference exceeds MAX_REL_DIFF; refuses to start without a CUDA GPU. Planned to take 5-8 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/test_kernels.py"
MAX_REL_DIFF = 2e-2  # bf16 y of the kernels vs the grouped-GEMM baseline on the same weights (relative L2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (plain CPU work: usable without a GPU)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the results file (JSON)")
    p.add_argument("--workers", type=int, default=4, help="pytest processes compiling and running the tests")
    p.add_argument("--tokens", default="1,16,128,1024,4096", help="benchmark token counts (bench/gpu_moe.py)")
    p.add_argument("--repeat", type=int, default=10, help="benchmark timed runs per measurement")
    args = p.parse_args(argv)
    if args.workers < 1 or args.repeat < 1:
        p.error("--workers and --repeat must be at least 1")
    return args


def pytest(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """A pytest process over the repository's tests (no cache written)."""
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def collect(marker: str | None, env: dict[str, str]) -> list[str]:
    """Node ids of the kernel tests (those with `marker` only, if given)."""
    out, _ = pytest("--collect-only", TESTS, *(["-m", marker] if marker else []), env=env).communicate()
    return [line.strip() for line in out.splitlines() if line.startswith(TESTS + "::")]


def outcomes(junit: Path) -> dict[str, dict]:
    """Test id -> {"outcome": passed / failed / skipped, "seconds", "message"} from a pytest JUnit XML file."""
    got = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test = f"{TESTS}::{case.get('name')}"
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[bad[0].tag] if bad else "passed"
        got[test] = {"outcome": outcome, "seconds": float(case.get("time", 0)),
                     "message": (bad[0].get("message") or "")[:2000] if bad else ""}
    return got


def run_tests(workers: int) -> dict:
    """The kernel tests, compiled (not interpreted), split round-robin over `workers` pytest processes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    every, marked = collect(None, env), collect("cuda", env)
    tests: dict[str, dict] = {}
    logs = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = [every[i::workers] for i in range(workers) if every[i::workers]]
        procs = [pytest("--junitxml", f"{tmp}/{i}.xml", *ids, env=env) for i, ids in enumerate(shards)]
        for i, proc in enumerate(procs):
            log = proc.communicate()[0]
            if proc.returncode:
                logs.append(log[-4000:])
            if Path(f"{tmp}/{i}.xml").exists():
                tests.update(outcomes(Path(f"{tmp}/{i}.xml")))
    for test in every:  # a shard that died leaves its tests without an outcome
        tests.setdefault(test, {"outcome": "failed", "seconds": 0.0, "message": "no outcome (the process died?)"})
    return {"seconds": time.perf_counter() - start, "cuda_marked": marked, "tests": tests, "failed_logs": logs}


def benchmark(tokens: str, repeat: int) -> dict:
    """bench/gpu_moe.py over bf16, FP8 and FP4 experts with --check; its roofline and rows."""
    spec = importlib.util.spec_from_file_location("gpu_moe", Path(__file__).with_name("gpu_moe.py"))
    gpu_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_moe)
    start = time.perf_counter()
    result = gpu_moe.run(gpu_moe.parse_args(["--tokens", tokens, "--repeat", str(repeat), "--check"]))
    return {**result, "seconds": time.perf_counter() - start}


def failures(results: dict) -> list[str]:
    """What failed: tests, `cuda` tests that did not pass, a benchmark error, checked differences too large."""
    bad = []
    tests = results.get("tests", {}).get("tests", {})
    bad += [f"{t}: {r['outcome']} {r['message'][:300]}".strip() for t, r in tests.items() if r["outcome"] == "failed"]
    bad += [f"{t}: {tests[t]['outcome'] if t in tests else 'not run'} (a cuda test must pass on a GPU)"
            for t in results.get("tests", {}).get("cuda_marked", []) if tests.get(t, {}).get("outcome") != "passed"]
    bench = results.get("benchmark", {})
    if "error" in bench:
        bad.append(f"benchmark: {bench['error']}")
    bad += [f"benchmark T={r['tokens']} {r['dtype']}: y differs from the baseline by {r['rel_diff']:.3g} "
            f"(> {MAX_REL_DIFF})" for r in bench.get("rows", []) if r.get("rel_diff", 0) > MAX_REL_DIFF]
    return bad


def summary(results: dict) -> str:
    """The short markdown summary of a results dict."""
    env, lines = results["environment"], []
    lines.append(f"# GPU check: {env['device']} (sm_{env['capability']}), torch {env['torch']}, "
                 f"triton {env['triton']}\n")
    if "tests" in results:
        t = results["tests"]
        count = {o: sum(r["outcome"] == o for r in t["tests"].values()) for o in ("passed", "failed", "skipped")}
        cuda = sum(t["tests"].get(c, {}).get("outcome") == "passed" for c in t["cuda_marked"])
        lines.append(f"- {TESTS} compiled on the GPU: {count['passed']} passed, {count['failed']} failed, "
                     f"{count['skipped']} skipped; cuda-marked {cuda} of {len(t['cuda_marked'])} passed "
                     f"({t['seconds']:.0f} s)")
    bench = results.get("benchmark", {})
    if bench.get("rows"):
        lines.append(f"- bench/gpu_moe.py ({bench['seconds']:.0f} s): H={bench['shape']['H']} I={bench['shape']['I']} "
                     f"E={bench['shape']['E']} k={bench['shape']['k']}, baseline {bench['baseline']}, copy roofline "
                     f"{bench['copy_gbs']:.0f} GB/s, bf16 matmul {bench['matmul_tflops']:.0f} TFLOP/s\n")
        lines.append("| T | weights | triton ms | torch ms | speedup | GB/s | % copy | TFLOP/s | rel diff |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in bench["rows"]:
            lines.append(f"| {r['tokens']} | {r['dtype']} | {r['triton_ms']:.3f} | {r['torch_ms']:.3f} | "
                         f"{r['speedup']:.2f}x | {r['gbs']:.0f} | {100 * r['copy_fraction']:.0f}% | "
                         f"{r['tflops']:.1f} | {r.get('rel_diff', float('nan')):.1e} |")
    elif "error" in bench:
        lines.append(f"- bench/gpu_moe.py failed: {bench['error']}")
    bad = failures(results)
    lines.append("\n**PASS**" if not bad else f"\n**FAIL** ({len(bad)}):\n" + "\n".join(f"- {b}" for b in bad[:30]))
    return "\n".join(lines) + "\n"


def environment() -> dict:
    """The device and software the check ran on."""
    import triton

    major, minor = torch.cuda.get_device_capability()
    return {"device": torch.cuda.get_device_name(), "capability": f"{major}{minor}", "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs a CUDA GPU (one H100 or H200); none is visible here. "
                         "Without one, `make test` runs the kernels on Triton's CPU interpreter and "
                         "tests/test_aot.py compiles them for sm_80/sm_90/sm_100.")
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("bench/gpu_check.py needs triton: pip install -e '.[dev]'")
    start = time.perf_counter()
    results = {"environment": environment(), "tests": run_tests(args.workers)}
    try:
        results["benchmark"] = benchmark(args.tokens, args.repeat)
    except Exception as e:  # noqa: BLE001 - recorded as a failure in the results file
        results["benchmark"] = {"error": f"{type(e).__name__}: {e}"}
    results["seconds"] = time.perf_counter() - start
    results["summary"] = summary(results)
    results["failures"] = failures(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(results["summary"])
    print(f"results: {args.out} ({results['seconds']:.0f} s)")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
