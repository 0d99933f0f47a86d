"""Every Triton kernel in kernels/ compiles ahead of time, without a GPU, for sm_80 (A100), sm_90 (H100/H200)
and sm_100 (B200): every launch its dispatcher makes in fp32, fp16 and bf16 activations, with float, FP8 and
FP4 weights, in every launch configuration the dispatchers choose (docs/references.md, "Triton without a GPU").

The launches come from the dispatchers themselves. In a subprocess without TRITON_INTERPRET (the test session
sets it where there is no GPU), each kernel is swapped for a recorder, the compute capability the dispatchers
read is faked to the target's (so FP8 is decoded from its bytes on sm_80, as there), and the public functions
run on CPU tensors over problem sizes that reach every entry of fused_moe.CONFIGS, every block size of the
router, alignment, sum and linear kernels, the published routers, the epilogue options and both ids dtypes.
Each distinct launch is specialised as Triton specialises a real one (its launch binder: pointer dtypes,
divisibility, constexprs, options) and compiled to a cubin with the ptxas triton ships, in a process pool
over a fresh cache. The GEMMs are compiled in every combination of tile config, activation dtype and weight
format (they share shared memory and registers); the other choices (epilogues, block sizes, routers, ids and
logits dtypes) each once, beside the bf16 GEMMs.

Run it on its own with `python tests/test_aot.py 80 90 100` (prints a JSON report).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90, 100)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOKENS = [2**i + 1 for i in range(14)]  # 2 .. 8193 tokens: every CONFIGS row and alignment block size
EXPERTS, TOP_K, HIDDEN, INTER = 4, 3, 256, 128  # 3 * T pairs: never a multiple of 16, as most real counts


# ---------------------------------------------------------------- the test (pytest side)

@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The subprocess's JSON report over all targets: compiled in a fresh Triton cache, interpreter off."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, __file__, *map(str, TARGETS)], capture_output=True, text=True, env=env,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-5000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("arch", TARGETS)
def test_every_kernel_compiles(report, arch):
    target = report["targets"][str(arch)]
    if "skipped" in target:
        pytest.skip(target["skipped"])
    assert not target["failures"], f"{len(target['failures'])} of {target['compiled']} launches failed:\n" + \
        "\n".join(target["failures"])
    assert sorted(target["kernels"]) == sorted(report["kernels"]), "some kernels were never launched"
    print(f"sm_{arch}: {target['compiled']} launches compiled ({report['seconds']:.0f} s for all targets, "
          f"{report['workers']} processes)")


# ---------------------------------------------------------------- recording launches (subprocess side)

def routers():
    """The published routers: every score function, group limits and top-k width, 8 to 384 experts."""
    from workbench.routing import RouterSpec

    return {
        "mixtral": RouterSpec(8, 2, score="softmax", renormalize=True),
        "qwen1.5-moe": RouterSpec(60, 4, score="softmax"),
        "olmoe": RouterSpec(64, 8, score="softmax"),
        "qwen3-moe": RouterSpec(128, 8, score="softmax", renormalize=True),
        "gpt-oss-120b": RouterSpec(128, 4, score="identity", weight_softmax=True, logit_bias=True),
        "deepseek-v2": RouterSpec(160, 6, score="softmax", groups=8, topk_groups=3, group_score="max", scaling=16.0),
        "deepseek-v3": RouterSpec(256, 8, score="sigmoid", correction_bias=True, groups=8, topk_groups=4,
                                  renormalize=True, norm_eps=1e-20, scaling=2.5),
        "deepseek-v4-flash": RouterSpec(256, 6, score="sqrtsoftplus", correction_bias=True, renormalize=True,
                                        norm_eps=1e-20, scaling=1.5),
        "kimi-k2": RouterSpec(384, 8, score="sigmoid", correction_bias=True, renormalize=True, norm_eps=1e-20,
                              scaling=2.827),
    }


def weights(fmt: str, experts: int, dtype: torch.dtype):
    """gate, up [E, I, H], down [E, H, I] and their scales in `fmt` (float, FP8 with 128 x 128 blocks, FP4)."""
    shapes = ((experts, INTER, HIDDEN), (experts, INTER, HIDDEN), (experts, HIDDEN, INTER))
    if fmt == "float":
        return [torch.zeros(s, dtype=dtype) for s in shapes], None
    if fmt == "fp8":
        return ([torch.zeros(s, dtype=torch.float8_e4m3fn) for s in shapes],
                [torch.ones(e, -(-o // 128), -(-i // 128)) for e, o, i in shapes])
    return ([torch.zeros(e, o, i // 2, dtype=torch.uint8) for e, o, i in shapes],
            [torch.full((e, o, i // 32), 127, dtype=torch.uint8) for e, o, i in shapes])


def drive(K) -> None:
    """Call every dispatcher over the problem sizes in the module docstring (kernels recorded, never run)."""
    from workbench.kernels.fused_moe import launch_config

    def experts(x, ids, w, fmt, **options):
        (gate, up, down), scales = weights(fmt, EXPERTS, x.dtype)
        K.fused_experts(x, ids, w, gate, up, down, scales=scales, **options)

    for dtype in DTYPES:  # the GEMMs: every table row x activation dtype x weight format (unweighted sums too)
        for fmt in ("float", "fp8", "fp4"):
            for tokens in TOKENS:
                experts(torch.zeros(tokens, HIDDEN, dtype=dtype), torch.randint(0, EXPERTS, (tokens, TOP_K)),
                        torch.rand(tokens, TOP_K), fmt)
        for tokens in TOKENS:  # the linear's rows choose from the same table
            K.block_fp8_linear(torch.zeros(tokens, HIDDEN, dtype=dtype),
                               torch.zeros(INTER, HIDDEN, dtype=torch.float8_e4m3fn), torch.ones(1, 2), (128, 128))
    bf16 = torch.bfloat16  # the epilogues, block sizes and routers beside the bf16 GEMMs
    x, ids, w = torch.zeros(5, HIDDEN, dtype=bf16), torch.randint(0, EXPERTS, (5, TOP_K)), torch.rand(5, TOP_K)
    experts(x, ids, w, "float", limit=10.0)  # DeepSeek-V4's clamp
    experts(x, ids, w, "float", limit=7.0, alpha=1.702, biases=(  # GPT-OSS: biases, clamp and its gate
        torch.zeros(EXPERTS, INTER, dtype=bf16), torch.zeros(EXPERTS, INTER, dtype=bf16),
        torch.zeros(EXPERTS, HIDDEN, dtype=bf16)))
    experts(x, ids.int(), w, "float", want_out=True)  # int32 ids; unweighted down GEMM, weighted sum
    for hidden in (2**i for i in range(12)):  # every moe_sum block size
        K.moe_sum(torch.zeros(3, TOP_K, hidden, dtype=bf16), torch.rand(3, TOP_K))
    specs = routers()
    for spec in specs.values():  # each published router on fp32 logits (as models.moe.Router passes them)
        bias = torch.zeros(spec.experts) if spec.correction_bias else None
        ids, w = K.route(torch.zeros(33, spec.experts), spec, bias)
        K.align(ids, spec.experts, launch_config(ids.numel(), spec.experts, bf16).block_m)  # its experts aligned
    spec = specs["deepseek-v3"]
    for dtype in (torch.float16, torch.bfloat16):
        K.route(torch.zeros(33, spec.experts, dtype=dtype), spec, torch.zeros(spec.experts))
    K.route(torch.zeros(33, spec.experts), spec, torch.zeros(spec.experts), ids_dtype=torch.int32)


def jit_kernels() -> dict:
    """Every launchable Triton kernel of workbench.kernels: `*_kernel` JIT functions of its `*_jit` modules."""
    import workbench.kernels as K

    found = {}
    for info in pkgutil.iter_modules(K.__path__):
        if info.name.endswith("_jit"):
            module = importlib.import_module(f"workbench.kernels.{info.name}")
            for name, fn in vars(module).items():
                if name.endswith("_kernel") and hasattr(fn, "fn"):
                    found[f"{module.__name__}:{name}"] = (module, name, fn)
    return found


def record(arch: int) -> list[dict]:
    """The distinct launches the dispatchers make for compute capability `arch`, specialised for it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    import workbench.kernels as K

    backend = make_backend(GPUTarget("cuda", arch, 32))
    launches: dict[str, dict] = {}

    class Recorder:
        """Stands in for a kernel: `kernel[grid](*args, **kwargs)` specialises the launch instead of running it."""

        def __init__(self, key: str, fn):
            self.key, self.fn = key, fn
            self.bind = create_function_from_signature(fn.signature, fn.params, backend)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                bound, specialization, options = self.bind(*args, **kwargs)
                options, signature, constexprs, attrs = self.fn._pack_args(backend, kwargs, bound, specialization,
                                                                           options)
                names = {(i,): p.name for i, p in enumerate(self.fn.params)}
                job = {"kernel": self.key, "arch": arch, "signature": signature, "constexprs": constexprs,
                       "attrs": attrs, "options": options.__dict__,
                       "what": ", ".join([*(f"{names[k]}={v}" for k, v in constexprs.items()),
                                          *(f"{p}={signature[p]}" for p in signature if signature[p][0] == "*"),
                                          f"num_warps={options.num_warps}", f"num_stages={options.num_stages}"])}
                key = [self.key, signature, *(repr(sorted(d.items())) for d in (constexprs, attrs, job["options"]))]
                launches.setdefault(json.dumps(key), job)
            return launch

    saved = {}
    for key, (module, name, fn) in jit_kernels().items():
        saved[key] = (module, name, fn)
        setattr(module, name, Recorder(key, fn))
    capability = K.backend.capability
    K.backend.capability = lambda t: divmod(arch, 10)
    try:
        drive(K)
    finally:
        K.backend.capability = capability
        for module, name, fn in saved.values():
            setattr(module, name, fn)
    return list(launches.values())


def compile_launch(job: dict) -> str | None:
    """Compile one recorded launch to a cubin; the error (first lines) if it fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = job["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                       target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as e:  # noqa: BLE001 - every failure is reported, with the launch that caused it
        return f"{type(e).__name__}: " + " | ".join(str(e).strip().splitlines()[-6:])
    return None


def unsupported(arch: int) -> str | None:
    """Why this triton cannot target sm_<arch> (no NVIDIA backend, or its ptxas lacks the arch), or None."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        return "this triton has no NVIDIA backend"
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    names = subprocess.run([ptxas, "--help"], capture_output=True, text=True).stdout
    if f"'{sm_arch_from_capability(arch)}'" not in names:
        return f"the ptxas this triton ships ({ptxas}) cannot target {sm_arch_from_capability(arch)}"
    return None


def main(archs: list[int]) -> dict:
    """Record and compile every launch for each target; a JSON-able report."""
    assert "TRITON_INTERPRET" not in os.environ, "compile with the interpreter off"
    start = time.perf_counter()
    kernels = sorted(jit_kernels())
    report = {"kernels": kernels, "targets": {}}
    jobs = []
    for arch in archs:
        reason = unsupported(arch)
        if reason:
            report["targets"][str(arch)] = {"skipped": reason}
            continue
        launches = record(arch)
        report["targets"][str(arch)] = {"compiled": len(launches), "failures": [],
                                        "kernels": sorted({j["kernel"] for j in launches})}
        jobs += launches
    workers = os.cpu_count() or 1
    jobs.sort(key=lambda j: "gate_up" not in j["kernel"] and "down" not in j["kernel"])  # the slow ones first
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for job, error in zip(jobs, pool.map(compile_launch, jobs)):
            if error:
                report["targets"][str(job["arch"])]["failures"].append(
                    f"{job['kernel'].split(':')[1]} for sm_{job['arch']} ({job['what']}): {error}")
    report.update(seconds=time.perf_counter() - start, workers=workers, launches=len(jobs))
    return report


if __name__ == "__main__":
    print(json.dumps(main([int(a) for a in sys.argv[1:]] or list(TARGETS))))
