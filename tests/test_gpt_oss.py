"""GPT-OSS parity with the transformers oracle, the per-expert hooks, and refusal of malformed MXFP4 experts (MXFP4
checkpoints as published: tests/test_quantised.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file, save_file

import workbench as wb
from oracle import assert_parity, input_ids, make_checkpoint, routing_is_nontrivial

VOCAB = 96


def config(swiglu_limit: float = 7.0, truncate: bool = False) -> tf.GptOssConfig:
    """Tiny GPT-OSS: 4 alternating sliding(4)/full layers, so the window bites at T=13."""
    rope = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                truncate=truncate, original_max_position_embeddings=4096)
    return tf.GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=6,
                           num_experts_per_tok=2, sliding_window=4, max_position_embeddings=131072,
                           swiglu_limit=swiglu_limit, rope_parameters=rope)


@pytest.mark.parametrize("limit,truncate", [(7.0, False), (0.5, True)])  # 0.5: the clamp bites
def test_gpt_oss_parity(tmp_path, limit, truncate):
    hf = make_checkpoint(config(limit, truncate), tmp_path)
    out = assert_parity(tmp_path, hf, VOCAB)
    assert routing_is_nontrivial(out["cache"])
    model = out["model"]
    assert [layer.attn.window for layer in model.layers.values()] == [4, None, 4, None]


def test_expert_hooks_match_hand_computation(tmp_path):
    make_checkpoint(config(swiglu_limit=0.5), tmp_path)
    model = wb.load(tmp_path, dtype=torch.float32)
    _, cache = model.run_with_cache(input_ids(VOCAB), names=["layers.0.*"])
    b, t = 1, 9
    x = model.layers["0"].ffn_norm(cache["layers.0.resid_mid"])[b, t]
    ex = model.layers["0"].ffn.experts
    for slot in range(2):
        e = int(cache["layers.0.router.topk_ids"][b, t, slot])
        gate = (ex.gate_proj[e] @ x + ex.gate_bias[e]).clamp(max=0.5)
        up = (ex.up_proj[e] @ x + ex.up_bias[e]).clamp(-0.5, 0.5)
        hidden = (up + 1) * gate * torch.sigmoid(1.702 * gate)
        torch.testing.assert_close(cache["layers.0.experts.hidden"][b, t, slot], hidden)
        torch.testing.assert_close(cache["layers.0.experts.out"][b, t, slot], ex.down_proj[e] @ hidden + ex.down_bias[e])
    logits = F.linear(x, model.layers["0"].ffn.router.weight, model.layers["0"].ffn.router.bias)
    torch.testing.assert_close(cache["layers.0.router.topk_weights"][b, t], logits.topk(2).values.softmax(-1))
    moe = (cache["layers.0.router.topk_weights"][..., None] * cache["layers.0.experts.out"]).sum(-2)
    torch.testing.assert_close(cache["layers.0.moe.out"], moe)


def test_mxfp4_experts_are_refused(tmp_path):
    """MXFP4 blocks need quant_method "mxfp4" in the config, and blocks that do not fit the config are refused."""
    make_checkpoint(config(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    fused = weights.pop("model.layers.0.mlp.experts.gate_up_proj")
    weights["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(*fused.shape[:2], 3, 16, dtype=torch.uint8)
    weights["model.layers.0.mlp.experts.gate_up_proj_scales"] = torch.zeros(*fused.shape[:2], 3, dtype=torch.uint8)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(wb.CheckpointError, match=r"gate_up_proj_(blocks|scales)"):
        wb.load(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(wb.CheckpointError, match="MXFP4"):
        wb.load(tmp_path)
