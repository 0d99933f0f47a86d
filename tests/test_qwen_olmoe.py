"""Parity of Qwen2-MoE, Qwen3-MoE and OLMoE with the transformers oracle, and the fused-expert checkpoint layout."""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import workbench as wb
from oracle import assert_parity, input_ids, legacy_rope, make_checkpoint, routing_is_nontrivial

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24)


def qwen2(**kw):
    return tf.Qwen2MoeConfig(**COMMON, **MOE, shared_expert_intermediate_size=40, **kw)


def qwen3(**kw):
    return tf.Qwen3MoeConfig(**COMMON, **MOE, head_dim=16, norm_topk_prob=True, **kw)


def olmoe(**kw):
    return tf.OlmoeConfig(**COMMON, num_experts=6, num_experts_per_tok=2, eos_token_id=None, **kw)


def check_layers(model, moe_layers: list[int], shared: bool) -> None:
    """MoE layers expose router hooks (and shared.out when the family has a shared expert); the rest mlp.out."""
    names = set(model.hook_names)
    for i in range(COMMON["num_hidden_layers"]):
        sparse = i in moe_layers
        assert (f"layers.{i}.router.topk_ids" in names) == sparse
        assert (f"layers.{i}.shared.out" in names) == (sparse and shared)
        assert (f"layers.{i}.mlp.out" in names) == (not sparse)


@pytest.mark.parametrize("name,config,moe_layers,shared", [
    ("qwen2-raw-weights", lambda: qwen2(norm_topk_prob=False), [0, 1, 2], True),
    ("qwen2-renormalised", lambda: qwen2(norm_topk_prob=True), [0, 1, 2], True),
    ("qwen2-sparse-step-2", lambda: qwen2(decoder_sparse_step=2), [1], True),
    ("qwen2-mlp-only-1", lambda: qwen2(mlp_only_layers=[1]), [0, 2], True),
    ("qwen2-sliding", lambda: qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=2), [0, 1, 2], True),
    ("qwen3", lambda: qwen3(), [0, 1, 2], False),
    ("qwen3-sliding", lambda: qwen3(use_sliding_window=True, sliding_window=4), [0, 1, 2], False),
    ("qwen3-mlp-only-sparse-step", lambda: qwen3(mlp_only_layers=[0], decoder_sparse_step=1), [1, 2], False),
    ("olmoe", lambda: olmoe(norm_topk_prob=False), [0, 1, 2], False),
    ("olmoe-clip-qkv", lambda: olmoe(clip_qkv=0.5), [0, 1, 2], False),
])
def test_parity(tmp_path, name, config, moe_layers, shared):
    hf = make_checkpoint(config(), tmp_path)
    out = assert_parity(tmp_path, hf, COMMON["vocab_size"])
    assert routing_is_nontrivial(out["cache"])
    check_layers(out["model"], moe_layers, shared)


def test_qwen2_legacy_rope_config(tmp_path):
    """Qwen2-MoE's config in the pre-5.x layout, YaRN-scaled as Qwen's long-context configs are (`rope_theta` and a
    `rope_scaling` dict with `type: yarn`, no `rope_parameters`): the oracle's logits and routing."""
    make_checkpoint(qwen2(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                               original_max_position_embeddings=64)), tmp_path)
    hf = legacy_rope(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_theta"] == 1e6 and config["rope_scaling"]["type"] == "yarn"
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["rope_theta"] == 1e6
    assert routing_is_nontrivial(assert_parity(tmp_path, hf, COMMON["vocab_size"])["cache"])


def test_qwen2_norm_topk_prob_read_from_config(tmp_path):
    """The saved config.json decides renormalisation: the weights of a True checkpoint sum to one per token."""
    make_checkpoint(qwen2(norm_topk_prob=True), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["norm_topk_prob"] is True
    _, cache = wb.load(tmp_path).run_with_cache(input_ids(COMMON["vocab_size"]), names=["layers.0.router.topk_weights"])
    torch.testing.assert_close(cache["layers.0.router.topk_weights"].sum(-1), torch.ones(2, 13))


def test_qwen3_fused_experts_layout(tmp_path):
    """A checkpoint with experts fused ([E, 2I, H] gate rows first, [E, H, I] down) loads to identical logits."""
    make_checkpoint(qwen3(), tmp_path)
    ids = input_ids(COMMON["vocab_size"])
    reference = wb.load(tmp_path, dtype=torch.float32)(ids)
    E = MOE["num_experts"]
    for file in tmp_path.glob("*.safetensors"):
        tensors = load_file(file)
        layers = sorted({int(k.split(".")[2]) for k in tensors if ".mlp.experts." in k})
        assert layers, "expected per-expert tensors in the saved checkpoint"
        for i in layers:
            prefix = f"model.layers.{i}.mlp.experts"
            gate = [tensors.pop(f"{prefix}.{e}.gate_proj.weight") for e in range(E)]
            up = [tensors.pop(f"{prefix}.{e}.up_proj.weight") for e in range(E)]
            down = [tensors.pop(f"{prefix}.{e}.down_proj.weight") for e in range(E)]
            tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gate, up)])
            tensors[f"{prefix}.down_proj"] = torch.stack(down)
        assert not any(".experts.0." in k for k in tensors)
        save_file(tensors, file, metadata={"format": "pt"})
    fused = wb.load(tmp_path, dtype=torch.float32)(ids)
    assert torch.equal(fused, reference)
