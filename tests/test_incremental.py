"""Chunk-by-chunk forward with `cache=State()` equals one whole-sequence forward, for every attention kind."""

import pytest
import transformers as tf

import workbench as wb
from oracle import T, assert_chunked_equals_whole, input_ids, make_checkpoint

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SMALL, intermediate_size=48),
    "qwen2-sliding": lambda: tf.Qwen2Config(**SMALL, intermediate_size=48, use_sliding_window=True,
                                            sliding_window=4, max_window_layers=1),
    "mixtral-sliding": lambda: tf.MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=6,
                                                num_experts_per_tok=2, sliding_window=5),
    "gpt-oss-sinks-sliding": lambda: tf.GptOssConfig(**SMALL, intermediate_size=16, head_dim=8, num_local_experts=6,
                                                     num_experts_per_tok=2, sliding_window=4),
    "deepseek-v3-mla": lambda: tf.DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, intermediate_size=48,
                                                   moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                                   n_group=2, topk_group=1, n_shared_experts=1, kv_lora_rank=16,
                                                   q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8,
                                                   v_head_dim=8, first_k_dense_replace=1),
    "qwen3-moe": lambda: tf.Qwen3MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
                                           num_experts_per_tok=2, head_dim=8),
    "olmoe": lambda: tf.OlmoeConfig(**SMALL, intermediate_size=24, num_experts=6, num_experts_per_tok=2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_equals_whole(tmp_path, name):
    make_checkpoint(CONFIGS[name](), tmp_path)
    model = wb.load(tmp_path)
    ids = input_ids(96)
    routing = [n for n in model.hook_names if n.endswith("topk_ids")]
    state = assert_chunked_equals_whole(model, ids, routing)
    # sliding layers keep only the keys later tokens can see
    for i, layer in model.layers.items():
        window = getattr(layer.attn, "window", None)
        kept = state.layers[i]["pos"]
        assert len(kept) == (min(window - 1, T) if window else T)
        assert int(kept[-1]) == T - 1


def test_mla_state_holds_only_latent_and_rope_key(tmp_path):
    make_checkpoint(CONFIGS["deepseek-v3-mla"](), tmp_path)
    model = wb.load(tmp_path)
    state = wb.State()
    model(input_ids(96)[:, :6], cache=state)
    assert set(state.layers["1"]) == {"pos", "latent", "k_rope"}
    assert state.layers["1"]["latent"].shape == (2, 1, 6, 16)  # kv_lora_rank, one shared head
    assert state.layers["1"]["k_rope"].shape == (2, 1, 6, 4)   # qk_rope_head_dim


@pytest.mark.parametrize("size", [1, 7, 64])
@pytest.mark.parametrize("name", ["mixtral-sliding", "gpt-oss-sinks-sliding", "deepseek-v3-mla"])
def test_chunk_sizes_on_a_longer_sequence(tmp_path, name, size):
    """Chunks of 1, 7 and 64 tokens over 150 tokens (windows of 4-5 slide many times) equal one pass."""
    make_checkpoint(CONFIGS[name](), tmp_path)
    model = wb.load(tmp_path)
    routing = [n for n in model.hook_names if n.endswith("topk_ids")]
    assert_chunked_equals_whole(model, input_ids(96, seed=2, length=150), routing, chunks=size, tol=1e-4)
