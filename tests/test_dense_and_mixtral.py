"""Parity of the dense baselines (Llama, Qwen2) and Mixtral with the transformers oracle."""

import json

import pytest
import transformers as tf

from oracle import assert_parity, legacy_rope, make_checkpoint, routing_is_nontrivial

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize("name,config", [
    ("llama", lambda: tf.LlamaConfig(**COMMON)),
    ("llama3-rope-tied", lambda: tf.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    ("qwen2", lambda: tf.Qwen2Config(**COMMON)),
    ("qwen2-sliding", lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
])
def test_dense_parity(tmp_path, name, config):
    hf = make_checkpoint(config(), tmp_path)
    out = assert_parity(tmp_path, hf, COMMON["vocab_size"])
    assert not any("router" in n for n in out["model"].hook_names)
    assert "layers.0.mlp.out" in out["model"].hook_names


@pytest.mark.parametrize("window", [None, 5])
def test_mixtral_parity(tmp_path, window):
    cfg = tf.MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2, sliding_window=window)
    hf = make_checkpoint(cfg, tmp_path)
    out = assert_parity(tmp_path, hf, COMMON["vocab_size"])
    assert routing_is_nontrivial(out["cache"])


def test_mixtral_legacy_rope_config(tmp_path):
    """Mixtral's config.json as released (pre-5.x layout: top-level `rope_theta`, `rope_scaling: null`): the
    oracle's logits and routing."""
    cfg = tf.MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2,
                           rope_parameters=dict(rope_type="default", rope_theta=1e6))
    make_checkpoint(cfg, tmp_path)
    hf = legacy_rope(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_theta"] == 1e6 and config["rope_scaling"] is None
    assert hf.config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert routing_is_nontrivial(assert_parity(tmp_path, hf, COMMON["vocab_size"])["cache"])
