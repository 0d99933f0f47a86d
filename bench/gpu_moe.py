"""Routed-experts throughput on one GPU (H100/H200): the Triton fused MoE vs a torch grouped-GEMM baseline.

DeepSeek-V3/V4-like layer (H=7168, I=2048, E=256, k=8) at T tokens, bf16 weights, FP8 e4m3 weights with
128 x 128 block scales and FP4 e2m1 weights with an e8m0 exponent per 32 inputs. For each T and dtype it
prints the time of both paths and their ratio, the achieved HBM bandwidth against a measured device-to-device
copy (the roofline), and TFLOP/s against a measured dense bf16 matmul. The router (sigmoid, 8 groups keep 4,
correction bias) is timed on its own, kernel vs reference.

    .venv/bin/python bench/gpu_moe.py [--tokens 1,16,128,1024,4096,16384] [--dtype bf16 fp8 fp4] [--repeat 20]
                                      [--check]

Needs a CUDA GPU and triton (the dev extras); exits with a message otherwise. The baseline gathers rows by
expert and calls `torch.nn.functional.grouped_mm` (or `torch._grouped_mm`; a per-expert loop where neither
runs); torch has no block-scaled grouped GEMM, so for FP8 and FP4 it runs on the bf16 weights. `--check` also
prints the relative L2 difference of y to the baseline run on the weights the kernel read (the dequantised
FP8 / FP4 weights for those). Bytes counted: the weights (and scales) of the experts that got tokens, plus x,
the per-pair hidden and outputs (written and read once), and y. FLOPs: 6 * T * k * H * I. Weights are random:
timings do not depend on their values. Memory: bf16 weights of 256 experts take 22.5 GB, the FP8 copy 11.3 GB
more, the FP4 copy 5.9 GB, and `--check` one dequantised copy (22.5 GB) at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from workbench.kernels import fused_experts, reference_route, route
from workbench.kernels.backend import has_triton
from workbench.quant import FP4_GROUP, FP4_VALUES, dequant_fp4, dequant_fp8
from workbench.routing import RouterSpec

FP8_BLOCK = (128, 128)
DTYPES = ("bf16", "fp8", "fp4")


def token_counts(text: str) -> list[int]:
    """'1,16,128' -> [1, 16, 128]."""
    return [int(t) for t in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (plain CPU work: usable without a GPU)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=token_counts, default=[1, 16, 128, 1024, 4096, 16384],
                   help="comma-separated token counts T")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES), help="expert weight formats")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048, help="expert intermediate size I")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--groups", type=int, default=8, help="router groups (1: no group limit)")
    p.add_argument("--topk-groups", type=int, default=4)
    p.add_argument("--repeat", type=int, default=20, help="timed runs per measurement (the median is reported)")
    p.add_argument("--check", action="store_true",
                   help="also print the relative L2 difference of y to the baseline on the weights the kernel read")
    args = p.parse_args(argv)
    if min(args.tokens) < 1 or args.topk > args.experts or args.experts % args.groups:
        p.error("need T >= 1, topk <= experts, and experts divisible by groups")
    return args


def timed(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    """Median milliseconds of fn on the current stream (the warmup also compiles the Triton kernels)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_roofline(repeat: int) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written) of a 4 GiB buffer."""
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), repeat)
    return 2 * (4 << 30) / ms / 1e6


def matmul_roofline(repeat: int) -> float:
    """Dense bf16 matmul TFLOP/s at 8192^3."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return 2 * 8192**3 / timed(lambda: a @ b, repeat) / 1e9


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights and one fp32 multiplier per 128 x 128 block (workbench.quant layout), one expert at a time."""
    experts, rows, cols = w.shape
    br, bc = FP8_BLOCK
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    scale = torch.empty(experts, -(-rows // br), -(-cols // bc), dtype=torch.float32, device=w.device)
    for e in range(experts):
        tile = F.pad(w[e].float(), (0, -cols % bc, 0, -rows % br)).view(scale.shape[1], br, scale.shape[2], bc)
        scale[e] = tile.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448
        q[e] = (tile / scale[e][:, None, :, None]).view(tile.shape[0] * br, -1)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 weights of w [E, out, in], one expert at a time: uint8 pairs of e2m1 codes [E, out, in / 2] (low nibble
    first) and uint8 e8m0 exponents [E, out, in / 32], each the power of two at or above its group's amax / 6."""
    experts, rows, cols = w.shape
    codes = torch.empty(experts, rows, cols // 2, dtype=torch.uint8, device=w.device)
    exps = torch.empty(experts, rows, cols // FP4_GROUP, dtype=torch.uint8, device=w.device)
    values = torch.tensor(FP4_VALUES[:8], device=w.device)
    for e in range(experts):
        groups = w[e].float().view(rows, -1, FP4_GROUP)
        exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2**-100) / 6)).clamp(-127, 127)
        x = groups / torch.exp2(exponent)[..., None]
        mag = torch.bucketize(x.abs(), (values[1:] + values[:-1]) / 2).to(torch.uint8)  # nearest magnitude
        c = (mag | ((x < 0).to(torch.uint8) << 3)).view(rows, cols)
        codes[e], exps[e] = c[:, 0::2] | (c[:, 1::2] << 4), (exponent + 127).to(torch.uint8)
    return codes, exps


def dequantized(fmt: str, weights: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The bf16 weights [E, out, in] the kernels read from FP8 or FP4 `weights` (codes, scales), into `out`."""
    codes, scales = weights
    for e in range(codes.shape[0]):
        out[e] = (dequant_fp8(codes[e], scales[e], FP8_BLOCK) if fmt == "fp8"
                  else dequant_fp4(codes[e], scales[e].view(torch.float8_e8m0fnu)))
    return out


def grouped_mm() -> tuple[str, Callable | None]:
    """The torch grouped GEMM this build has, by name, or None."""
    for owner, name in ((F, "grouped_mm"), (torch, "_grouped_mm")):
        if hasattr(owner, name):
            return f"{owner.__name__}.{name}", getattr(owner, name)
    return "per-expert loop", None


def torch_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              mm: Callable | None) -> torch.Tensor:
    """The baseline: rows sorted by expert, grouped GEMMs (gate/up fused), SiLU-GLU, weighted scatter-add."""
    k, inter = ids.shape[1], down.shape[2]
    flat = ids.flatten()
    order = torch.sort(flat, stable=True).indices
    rows = x[order // k]
    counts = torch.bincount(flat, minlength=gate_up.shape[0])
    if mm is not None:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        gu = mm(rows, gate_up.transpose(1, 2), offs=offs)
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        o = mm(h, down.transpose(1, 2), offs=offs)
    else:
        o = torch.empty(rows.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                gu = rows[start:start + c] @ gate_up[e].T
                o[start:start + c] = (F.silu(gu[:, :inter]) * gu[:, inter:]) @ down[e].T
                start += c
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    y.index_add_(0, order // k, o.float() * weights.flatten()[order, None])
    return y.to(x.dtype)


def run(args: argparse.Namespace) -> dict:
    """Time every T and weight format (printing a table as it goes); the roofline and the rows as a dict."""
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_moe.py needs a CUDA GPU (H100/H200); none is visible")
    if not has_triton():
        raise SystemExit("bench/gpu_moe.py needs triton: pip install -e '.[dev]'")
    torch.manual_seed(0)
    H, I, E, k = args.hidden, args.inter, args.experts, args.topk
    dev = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": dict(H=H, I=I, E=E, k=k)}
    print(f"{result['device']}  H={H} I={I} E={E} k={k}  torch {torch.__version__}")
    copy_gbs, mm_tflops = copy_roofline(args.repeat), matmul_roofline(args.repeat)
    result.update(copy_gbs=copy_gbs, matmul_tflops=mm_tflops, rows=[])
    print(f"roofline: copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s")

    gate_up = torch.randn(E, 2 * I, H, dtype=torch.bfloat16, device=dev).mul_(H**-0.5)  # gate rows, then up rows
    down = torch.randn(E, H, I, dtype=torch.bfloat16, device=dev).mul_(I**-0.5)
    quantized = {fmt: (quantize(gate_up), quantize(down)) for fmt, quantize in
                 (("fp8", quantize_fp8), ("fp4", quantize_fp4)) if fmt in args.dtype}
    mm_name, mm = grouped_mm()
    result["baseline"] = mm_name
    spec = RouterSpec(E, k, score="sigmoid", correction_bias=True, groups=args.groups, topk_groups=args.topk_groups,
                      group_score="top2sum", renormalize=True, norm_eps=1e-20, scaling=2.5)
    bias = 0.01 * torch.randn(E, device=dev)
    print(f"baseline: {mm_name}\n")
    print(f"{'T':>6} {'router us':>10} {'ref us':>8} | {'dtype':>5} {'triton ms':>10} {'torch ms':>9} {'speedup':>8} "
          f"{'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'%mm':>5}" + ("  rel diff" if args.check else ""))
    for T in args.tokens:
        x = torch.randn(T, H, dtype=torch.bfloat16, device=dev)
        logits = torch.randn(T, E, device=dev)
        ids, weights = route(logits, spec, bias)
        t_route = timed(lambda: route(logits, spec, bias), args.repeat) * 1e3
        t_ref = timed(lambda: reference_route(logits, spec, bias), args.repeat) * 1e3
        try:
            torch_moe(x, ids, weights, gate_up, down, mm)
        except RuntimeError as err:  # this build's grouped GEMM refuses these shapes: fall back to the loop
            mm_name, mm = "per-expert loop", None
            result["baseline"] = mm_name
            print(f"grouped GEMM failed ({str(err).splitlines()[0]}); baseline: {mm_name}")
        t_torch = timed(lambda: torch_moe(x, ids, weights, gate_up, down, mm), args.repeat)
        active = int(torch.unique(ids).numel())
        flops = 6 * T * k * H * I
        for dtype in args.dtype:
            if dtype == "bf16":
                run = lambda: fused_experts(x, ids, weights, gate_up, None, down)[0]  # noqa: E731
                weight_bytes = active * 3 * H * I * 2
            else:
                (gq, gs), (dq, ds) = quantized[dtype]
                run = lambda: fused_experts(x, ids, weights, gq, None, dq, scales=(gs, None, ds),  # noqa: E731
                                            block=FP8_BLOCK)[0]
                weight_bytes = active * (gq[0].numel() + dq[0].numel() + gs[0].element_size() * (gs[0].numel()
                                                                                                 + ds[0].numel()))
            t = timed(run, args.repeat)
            moved = weight_bytes + 2 * (T * H + 2 * T * k * I + 2 * T * k * H + T * H)
            gbs, tflops = moved / t / 1e6, flops / t / 1e9
            row = dict(tokens=T, dtype=dtype, router_us=t_route, router_reference_us=t_ref, triton_ms=t,
                       torch_ms=t_torch, speedup=t_torch / t, gbs=gbs, copy_fraction=gbs / copy_gbs, tflops=tflops,
                       matmul_fraction=tflops / mm_tflops)
            line = (f"{T:>6} {t_route:>10.1f} {t_ref:>8.1f} | {dtype:>5} {t:>10.3f} {t_torch:>9.3f} "
                    f"{t_torch / t:>7.2f}x {gbs:>7.0f} {100 * gbs / copy_gbs:>5.0f}% {tflops:>8.1f} "
                    f"{100 * tflops / mm_tflops:>4.0f}%")
            if args.check:
                row["rel_diff"] = check(run(), x, ids, weights, dtype, gate_up, down, quantized, mm)
                line += f"  {row['rel_diff']:.2e}"
            result["rows"].append(row)
            print(line)
    return result


def check(y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, dtype: str,
          gate_up: torch.Tensor, down: torch.Tensor, quantized: dict, mm: Callable | None) -> float:
    """Relative L2 difference of the kernels' y to the baseline on the weights they read (dequantised copies
    made one at a time, in gate_up's and down's own buffers' shapes)."""
    if dtype != "bf16":
        (gq, gs), (dq, ds) = quantized[dtype]
        gate_up = dequantized(dtype, (gq, gs), torch.empty_like(gate_up))
        down = dequantized(dtype, (dq, ds), torch.empty_like(down))
    want = torch_moe(x, ids, weights, gate_up, down, mm).float()
    return ((y.float() - want).norm() / want.norm()).item()


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
