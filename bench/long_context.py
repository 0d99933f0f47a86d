"""DeepSeek-V4 chunked forward over long contexts: time per token and state memory as the sequence grows.

Feeds one sequence chunk by chunk (`model(chunk, cache=state)`) through a tiny V4 (one sliding, one CSA
and one HCA layer, the published compress rates 4 and 128) and prints, at each mark, the state each layer
kind holds: sliding stays at `sliding_window - 1` keys, HCA grows by one entry per 128 tokens, CSA by one
per 4 (plus the indexer's own keys). A full-attention KV cache of the same head size is printed beside it.
The peer is transformers' V4 on the same checkpoint, fed the same chunks with its cache (first mark only).

    .venv/bin/python bench/long_context.py [--marks 8192,65536,262144] [--chunk 512] [--no-peer]

Needs the dev extras (transformers). Random weights: time and memory do not depend on what they are.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch
import transformers as tf

import workbench as wb
from workbench.models.base import tensor_bytes

S, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def config() -> tf.DeepseekV4Config:
    return tf.DeepseekV4Config(
        vocab_size=256, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        head_dim=64, partial_rotary_factor=0.25, q_lora_rank=64, num_experts_per_tok=2, n_routed_experts=8,
        layer_types=[S, CSA, HCA], mlp_layer_types=["hash_moe", "moe", "moe"], compress_rates={CSA: 4, HCA: 128},
        hc_mult=4, sliding_window=128, o_groups=2, o_lora_rank=32, index_n_heads=4, index_head_dim=32,
        index_topk=64, max_position_embeddings=1 << 20)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peer_seconds(folder: str, ids: torch.Tensor, chunk: int) -> float:
    """transformers' V4 fed the same chunks through its own cache."""
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cache = tf.DynamicCache(config=hf.config)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            hf(ids[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--marks", default="8192,65536,262144", help="token counts to report at")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers run")
    args = parser.parse_args()
    marks = sorted(int(m) for m in args.marks.split(","))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        cfg = config()
        tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
        model = wb.load(folder)
        ids = torch.randint(0, cfg.vocab_size, (1, marks[-1]), generator=torch.Generator().manual_seed(1))
        peer = None if args.no_peer else peer_seconds(folder, ids[:, : marks[0]], args.chunk)
    print(f"tiny V4: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, layers {cfg.layer_types}, "
          f"window {cfg.sliding_window}, rates 4/128, index_topk {cfg.index_topk}, chunk {args.chunk} tokens, "
          f"{torch.get_num_threads()} threads")
    full_kv = 2 * cfg.num_attention_heads * cfg.head_dim * 4  # fp32 K and V of one full-attention layer, per token
    print(f"{'tokens':>8} {'ms/token':>9} {'sliding':>10} {'CSA':>10} {'(entries)':>10} {'HCA':>10} {'(entries)':>10} "
          f"{'full-attn KV':>13} {'peak RSS':>10}")
    state, start, recent = wb.State(), 0, []
    with torch.no_grad():
        for mark in marks:
            while start < mark:
                t0 = time.perf_counter()
                model(ids[:, start:start + args.chunk], cache=state)
                recent = (recent + [(time.perf_counter() - t0) / args.chunk])[-8:]
                start += args.chunk
            layers = state.layers
            csa, hca = layers["1"], layers["2"]
            print(f"{mark:>8} {1e3 * sum(recent) / len(recent):>9.3f} {tensor_bytes(layers['0']) / 2**10:>8.1f}Ki "
                  f"{tensor_bytes(csa) / 2**20:>8.2f}Mi {csa['compressor']['entries'].shape[1]:>10} "
                  f"{tensor_bytes(hca) / 2**10:>8.1f}Ki {hca['compressor']['entries'].shape[1]:>10} "
                  f"{mark * full_kv / 2**20:>11.1f}Mi {peak_rss_mib():>8.0f}Mi")
    if peer is not None:
        state = wb.State()
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, marks[0], args.chunk):
                model(ids[:, s:s + args.chunk], cache=state)
        ours = time.perf_counter() - t0
        print(f"\nfirst {marks[0]} tokens in chunks of {args.chunk}: workbench {ours:.2f} s, transformers {peer:.2f} s "
              f"-> {peer / ours:.2f}x")


if __name__ == "__main__":
    main()
