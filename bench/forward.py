"""Forward throughput: workbench (reference `torch` backend) vs transformers on the same checkpoint.

Prints tokens/s for: transformers, workbench unhooked, workbench caching all routing hooks, and workbench
caching per-expert activations of every layer; ratios against transformers measured in the same run; and
the achieved fraction of a measured fp32 matmul roofline (2 x active parameters FLOPs per token).

    .venv/bin/python bench/forward.py [--family mixtral|deepseek_v3|deepseek_v4] [--tokens 512] [--repeat 3]

Needs the dev extras (transformers). Random weights: throughput does not depend on what they are.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

import workbench as wb

CONFIGS = {
    "mixtral": lambda: tf.MixtralConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                        num_experts_per_tok=2, max_position_embeddings=4096),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=4096),
    "deepseek_v4": lambda: tf.DeepseekV4Config(
        vocab_size=8192, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
        head_dim=128, partial_rotary_factor=0.25, q_lora_rank=192, n_routed_experts=32, num_experts_per_tok=4,
        hc_mult=4, sliding_window=128, o_groups=4, o_lora_rank=128, index_n_heads=8, index_head_dim=64,
        index_topk=64, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        num_hash_layers=1, max_position_embeddings=4096),
}


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=sorted(CONFIGS), default="mixtral")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        hf = tf.AutoModelForCausalLM.from_config(CONFIGS[args.family](), dtype=torch.float32).eval()
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # spread routing over the experts
        for name, table in hf.named_buffers():
            if name.endswith("tid2eid"):  # V4 hash layers: distinct random experts per token
                table.copy_(torch.rand(len(table), hf.config.n_routed_experts).argsort(-1)[:, : table.shape[1]])
        hf.save_pretrained(tmp)
        model = wb.load(Path(tmp))
        ids = torch.randint(0, 8192, (1, args.tokens))
        routing = [n for n in model.hook_names if ".router." in n]
        per_expert = [n for n in model.hook_names if ".experts." in n]
        runs = {
            "transformers": lambda: hf(ids),
            "workbench": lambda: model(ids),
            "workbench + routing cache": lambda: model.run_with_cache(ids, names=routing),
            "workbench + per-expert cache": lambda: model.run_with_cache(ids, names=routing + per_expert),
        }
        times = {k: best_time(f, args.repeat) for k, f in runs.items()}
        peak = matmul_flops()
    flops = 2 * active_params(model) * args.tokens
    print(f"{args.family}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{active_params(model) / 1e6:.1f}M active, {args.tokens} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"roofline: measured fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    print(f"{'run':30s} {'tokens/s':>10s} {'vs transformers':>16s} {'of roofline':>12s}")
    for k, t in times.items():
        print(f"{k:30s} {args.tokens / t:10.0f} {times['transformers'] / t:15.2f}x {flops / t / peak:11.1%}")


if __name__ == "__main__":
    main()
