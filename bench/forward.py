"""Forward throughput of the backends against transformers (and nnsight) on the same checkpoint, in one run.

For one random checkpoint (a ~150M-parameter DeepSeek-V3-style model, a ~150M Mixtral-style one, or a small
V4), fp32, one sequence of --tokens tokens, best of --repeat (timed in rounds that run each in turn),
it prints tokens/s of:
- transformers with its experts implementations (eager, grouped_mm; --hf-experts adds others): the best is the peer;
- workbench with the `torch` (reference) and `grouped` backends, unhooked;
- workbench `grouped` recording the full routing trace (every layer's topk_ids and topk_weights), and
  also every per-expert tensor;
- capturing every router output: nnsight on the transformers model against workbench's run_with_cache, on the
  whole sequence and on a --short-tokens prompt;
and the fraction of a measured fp32 sgemm roofline each run reaches (FLOPs: 2 x active parameters per token plus
causal attention scores and values). A second limit: the `grouped` forward's matmuls alone, each replayed at its
own shape (small expert blocks run below the square sgemm's rate), against which the forward's other work shows.

    .venv/bin/python bench/forward.py [--family deepseek_v3|mixtral|deepseek_v4] [--tokens 2048] [--repeat 3]

Needs the dev extras (transformers, nnsight). Random weights: throughput does not depend on what they are.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf
from torch.overrides import TorchFunctionMode

import workbench as wb
from workbench.models import stream

CONFIGS = {
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=320, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=48, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=4096),
    "mixtral": lambda: tf.MixtralConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                        num_experts_per_tok=2, max_position_embeddings=4096),
    "deepseek_v4": lambda: tf.DeepseekV4Config(
        vocab_size=8192, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
        head_dim=128, partial_rotary_factor=0.25, q_lora_rank=192, n_routed_experts=32, num_experts_per_tok=4,
        hc_mult=4, sliding_window=128, o_groups=4, o_lora_rank=128, index_n_heads=8, index_head_dim=64,
        index_topk=64, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        num_hash_layers=1, max_position_embeddings=4096),
}
HF_EXPERTS = ("eager", "grouped_mm")  # batched_mm also exists: 40x slower than these on CPU at 256 tokens


def random_checkpoint(cfg, folder: str):
    """The transformers model of `cfg` with perturbed random weights (fp32, eval), saved to `folder`."""
    hf = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # spread routing over the experts
        for name, table in hf.named_buffers():
            if name.endswith("tid2eid"):  # V4 hash layers: distinct random experts per token
                table.copy_(torch.rand(len(table), hf.config.n_routed_experts).argsort(-1)[:, : table.shape[1]])
    hf.save_pretrained(folder)
    return hf


def best_time(fn, repeat: int) -> float:
    return best_times({"": fn}, repeat)[""]


def best_times(fns: dict, repeat: int, before=None, rotate: bool = False, steady: bool = False) -> dict[str, float]:
    """Best of `repeat` for each function, timed in rounds that run each once in turn: a slow spell of this
    shared machine then lands on every run alike instead of on whichever happened to be timing. `before`, if
    given, runs untimed before each timed call (as `evict`); `rotate` starts each round one function later, so
    that each follows every other in some round; `steady` runs each function once untimed right before its timed
    call (then `before`), as in a loop of decode steps: what ran just before can slow a call (its heap, threads)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeat):
        for k in names[r % len(names):] + names[:r % len(names)] if rotate else names:
            fn = fns[k]
            if steady:
                fn()
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def matmul_flops(n: int = 1024, repeat: int = 5) -> float:
    """Measured fp32 matmul FLOP/s on this machine (the roofline for a matmul-bound forward)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: a @ b, repeat)


def active_params(model: wb.models.base.CausalLM) -> float:
    """Parameters a token touches: everything but the embedding, routed experts counted top_k / E."""
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            continue
        share = 1.0
        if ".ffn.experts." in name:
            spec = model.layers[name.split(".")[1]].ffn.router.spec
            share = spec.top_k / spec.experts
        total += p.numel() * share
    return total


def attention_flops(cfg, tokens: int) -> float:
    """Causal attention's score and value matmuls: 2 x 2 x T^2 / 2 x heads x head dims, per layer."""
    heads = cfg.num_attention_heads
    qk = getattr(cfg, "qk_nope_head_dim", 0) + getattr(cfg, "qk_rope_head_dim", 0) or cfg.hidden_size // heads
    v = getattr(cfg, "v_head_dim", None) or cfg.hidden_size // heads
    return 2 * tokens * tokens * heads * (qk + v) * cfg.num_hidden_layers


MATMULS = {F.linear, torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
           torch.einsum, F.scaled_dot_product_attention}


class _RecordMatmuls(TorchFunctionMode):
    """Records every matmul-like call (and its tensors, copied) that a forward makes."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            copy = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append((func, [copy(a) for a in args], {k: copy(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


_EVICT = torch.empty(1 << 24)


def evict() -> None:
    """Write 64 MiB (twice the largest last-level cache of the machines measured here), so that what a timed call
    reads next comes from memory, as a forward's weights do when each is used once per step."""
    _EVICT.fill_(1.0)


@contextlib.contextmanager
def streaming_kernel(wrap):
    """Within the block, workbench's few-row weight-streaming kernel (`stream_jit.kernel`) is replaced by
    wrap(kernel), to time or record its calls; the other compiled functions (activation, sum) run as they are."""
    original = stream._jit
    jit = original()
    patched = types.SimpleNamespace(**{k: getattr(jit, k) for k in dir(jit) if not k.startswith("_")})
    patched.kernel = wrap(jit.kernel)
    stream._jit = lambda: patched
    try:
        yield
    finally:
        stream._jit = original


def kernel_call_work(args: tuple) -> tuple[int, int]:
    """(weight bytes, FLOPs) of one call of the streaming kernel, from its arguments: each listed expert's weight
    operands (floats, or codes and their scales) read once, and 2 x input values x outputs per pair."""
    x, _, experts, begin, end, fmt, wf, wq, sf, sq = args[:10]
    held = wf if fmt == 0 else wq + (sf if fmt == 1 else sq)  # the weight operands the kernel reads
    widths = sum(w.shape[1] for w in (wf if fmt == 0 else wq))  # the projections' outputs, all together
    pairs = int((end - begin).sum())  # input rows, over the listed experts (a dense linear: one)
    return sum(w[0].nbytes for w in held) * len(experts), 2 * pairs * widths * x.shape[1]


def matmul_bound(run, repeat: int = 5, cold: bool = False) -> tuple[float, int]:
    """(seconds, calls): the time of `run`'s matmuls alone, each replayed on its own inputs at its own shape (best
    of `repeat`): what a forward with no other work would take, at the rate torch reaches for those shapes. `cold`
    evicts the caches before each replay (`evict`), as a forward's next weight is: for memory-bound runs."""
    with _RecordMatmuls() as rec:
        run()
    total = 0.0
    for func, args, kwargs in rec.calls:
        best = float("inf")
        for _ in range(repeat + 1):
            if cold:
                evict()
            t0 = time.perf_counter()
            func(*args, **kwargs)
            best = min(best, time.perf_counter() - t0)
        total += best
    return total, len(rec.calls)


def nnsight_router_capture(hf, ids: torch.Tensor):
    """Every router's output through nnsight's tracing of the transformers model."""
    from nnsight import NNsight

    traced = NNsight(hf)
    moe = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    gates = [traced.model.layers[i].mlp.gate for i in moe]

    def run():
        saved: list = []
        with traced.trace(ids):
            for g in gates:
                saved.append(g.output.save())
        assert saved and all(isinstance(s, (torch.Tensor, tuple)) for s in saved), "nnsight saved nothing usable"
        return saved
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=sorted(CONFIGS), default="deepseek_v3")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--short-tokens", type=int, default=32, help="prompt length of the second router-capture timing")
    ap.add_argument("--hf-experts", nargs="+", default=list(HF_EXPERTS), help="transformers experts implementations")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = CONFIGS[args.family]()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        hf = random_checkpoint(cfg, tmp)
        ours = {b: wb.load(Path(tmp), dtype=torch.float32, backend=b) for b in ("torch", "grouped")}
        ids = torch.randint(0, 8192, (1, args.tokens))
        routing = ["layers.*.router.topk_ids", "layers.*.router.topk_weights"]
        routers = ["layers.*.router.*"]
        per_expert = routing + ["layers.*.experts.*"]
        hf_runs = {}
        for impl in args.hf_experts:
            try:
                hf.set_experts_implementation(impl)
            except (ValueError, AttributeError) as e:
                print(f"transformers experts_implementation={impl}: unavailable ({e})")
                continue
            hf_runs[f"transformers ({impl})"] = lambda impl=impl: (hf.set_experts_implementation(impl), hf(ids))
        times = best_times(hf_runs, args.repeat)
        peer = min(times, key=times.get)
        hf.set_experts_implementation(peer.split("(")[1].rstrip(")"))
        g = ours["grouped"]
        runs = {
            "workbench torch": lambda: ours["torch"](ids),
            "workbench grouped": lambda: g(ids),
            "workbench grouped + routing trace": lambda: g.run_with_cache(ids, names=routing),
            "workbench grouped + per-expert cache": lambda: g.run_with_cache(ids, names=per_expert),
            f"nnsight on {peer}: router outputs": nnsight_router_capture(hf, ids),
            "workbench grouped: router outputs": lambda: g.run_with_cache(ids, names=routers),
        }
        times.update(best_times(runs, args.repeat))
        short = ids[:, : args.short_tokens]  # a prompt: where tracing overheads, not the forward, dominate
        capture = best_times({"nnsight": nnsight_router_capture(hf, short),
                              "workbench": lambda: g.run_with_cache(short, names=routers)}, args.repeat)
        peak = matmul_flops()
        bound, calls = matmul_bound(lambda: g(ids))
    flops = 2 * active_params(g) * args.tokens + attention_flops(cfg, args.tokens)
    print(f"{args.family}: {sum(p.numel() for p in g.parameters()) / 1e6:.1f}M params, "
          f"{active_params(g) / 1e6:.1f}M active, {args.tokens} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"roofline: measured fp32 sgemm {peak / 1e9:.1f} GFLOP/s; {flops / 1e9:.1f} GFLOP per forward")
    print(f"the grouped forward's {calls} matmuls alone, each replayed at its own shape (best of 5): "
          f"{bound * 1e3:.1f} ms, {flops / bound / peak:.1%} of sgemm; the forward took "
          f"{times['workbench grouped'] / bound:.2f}x that ({bound / times['workbench grouped']:.1%} of the bound)")
    print(f"{'run':44s} {'tokens/s':>9s} {'vs peer':>8s} {'of sgemm':>9s}")
    for k, t in times.items():
        print(f"{k:44s} {args.tokens / t:9.0f} {times[peer] / t:7.2f}x {flops / t / peak:8.1%}")
    base = times["workbench grouped"]
    print(f"routing trace overhead: {times['workbench grouped + routing trace'] / base - 1:+.1%}; "
          f"router outputs: workbench {times[f'nnsight on {peer}: router outputs'] / times['workbench grouped: router outputs']:.2f}x "
          f"faster than nnsight at {args.tokens} tokens, {capture['nnsight'] / capture['workbench']:.2f}x at "
          f"{args.short_tokens} ({capture['nnsight'] * 1e3:.1f} ms vs {capture['workbench'] * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
