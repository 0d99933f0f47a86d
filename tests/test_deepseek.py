"""Parity of DeepSeek-V2/V3 (MLA, grouped routing, shared experts) and Kimi-K2 look-alikes with the oracle."""

import json
import re
import shutil

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import workbench as wb
from oracle import assert_parity, legacy_rope, make_checkpoint, routing_is_nontrivial
from workbench.config import Config
from workbench.models.deepseek import _at_least, router_spec

VOCAB = 96
MLA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
           num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=12, n_shared_experts=1, max_position_embeddings=256)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, mscale=1.0, mscale_all_dim=0.7,
            original_max_position_embeddings=32, beta_fast=32, beta_slow=1)


def v3(**kw) -> tf.DeepseekV3Config:
    base = dict(MLA, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
                routed_scaling_factor=2.5, norm_topk_prob=True)
    return tf.DeepseekV3Config(**{**base, **kw})


def v2(**kw) -> tf.DeepseekV2Config:
    base = dict(MLA, n_routed_experts=8, num_experts_per_tok=3, routed_scaling_factor=1.5, first_k_dense_replace=1)
    return tf.DeepseekV2Config(**{**base, **kw})


def check(folder, hf) -> dict:
    """Oracle parity plus non-trivial routing in every MoE layer."""
    out = assert_parity(folder, hf, VOCAB)
    assert routing_is_nontrivial(out["cache"])
    return out


@pytest.mark.parametrize("name,config", [
    ("v3", lambda: v3()),
    ("v3-no-q-lora", lambda: v3(q_lora_rank=None)),
    ("v3-groups-8", lambda: v3(n_group=4, topk_group=2, num_experts_per_tok=3)),
    ("v3-groups-16-dense-first", lambda: v3(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                                            first_k_dense_replace=1, n_shared_experts=2)),
    ("v3-yarn", lambda: v3(rope_parameters=YARN, n_group=4, topk_group=2)),
    ("v2-greedy", lambda: v2(topk_method="greedy")),
    ("v2-group-limited", lambda: v2(topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=None)),
    ("v2-yarn", lambda: v2(rope_parameters=YARN)),
])
def test_parity(tmp_path, name, config):
    cfg = config()
    hf = make_checkpoint(cfg, tmp_path)
    out = check(tmp_path, hf)
    first = cfg.first_k_dense_replace
    dense = [n for n in out["model"].hook_names if n.endswith(".mlp.out")]
    assert dense == [f"layers.{i}.mlp.out" for i in range(first)]
    assert f"layers.{first}.shared.out" in out["model"].hook_names
    if "groups" in name:  # the perturbed correction bias was loaded, in fp32
        bias = out["model"].layers[str(first)].ffn.router.correction_bias
        assert bias.dtype == torch.float32 and bias.abs().max() > 0.05


def test_legacy_rope_config(tmp_path):
    """A config in the pre-5.x layout, as DeepSeek-V3's own config.json writes it (`rope_theta` and a `rope_scaling`
    dict with `type: yarn`, no `rope_parameters`): the oracle's logits, routing and YaRN softmax scale."""
    make_checkpoint(v3(rope_parameters=YARN, n_group=4, topk_group=2), tmp_path)
    hf = legacy_rope(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in config and config["rope_scaling"]["type"] == "yarn"
    assert hf.config.rope_parameters["rope_type"] == "yarn" and hf.config.rope_parameters["factor"] == 8.0
    model = check(tmp_path, hf)["model"]
    m = 0.1 * 0.7 * torch.log(torch.tensor(8.0)).item() + 1
    assert model.layers["0"].attn.scale == pytest.approx(16**-0.5 * m * m)


@pytest.mark.parametrize("name,config,interleaved", [
    ("v3-interleaved", lambda: v3(rope_interleave=True), True),
    ("v3-halves", lambda: v3(rope_interleave=False, rope_parameters=YARN), False),
    ("v2-ignores-the-field", lambda: v2(rope_interleave=False), True),  # transformers' V2 always pairs adjacent
])
def test_rope_interleave(tmp_path, name, config, interleaved):
    """DeepSeek-V3's `rope_interleave: false` rotates MLA's rope channels as two halves (rotate-half), as transformers
    does; true (the default) in adjacent pairs."""
    hf = make_checkpoint(config(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_interleave"] is (name == "v3-interleaved")
    model = check(tmp_path, hf)["model"]
    assert model.layers["0"].attn.rotary.interleaved is interleaved


def test_yarn_scales_softmax(tmp_path):
    cfg = v3(rope_parameters=YARN)
    make_checkpoint(cfg, tmp_path)
    attn = wb.load(tmp_path).layers["0"].attn
    m = 0.1 * 0.7 * torch.log(torch.tensor(8.0)).item() + 1
    assert attn.scale == pytest.approx(16**-0.5 * m * m)


def test_mtp_layer_is_skipped(tmp_path):
    hf = make_checkpoint(v3(first_k_dense_replace=1), tmp_path)
    file = tmp_path / "model.safetensors"
    assert not (tmp_path / "model.safetensors.index.json").exists()
    tensors = load_file(file)
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.2."):
            tensors[name.replace("model.layers.2.", "model.layers.3.")] = t.clone()
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, file, metadata={"format": "pt"})
    check(tmp_path, hf)


def test_kimi_k2_lookalike_never_runs_shipped_code(tmp_path):
    saved, kimi = tmp_path / "v3", tmp_path / "kimi"
    hf = make_checkpoint(v3(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4), saved)
    shutil.copytree(saved, kimi)
    marker = tmp_path / "EXECUTED"
    (kimi / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((kimi / "config.json").read_text())
    config.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
                  auto_map={"AutoConfig": "modeling_x.Config", "AutoModelForCausalLM": "modeling_x.Model"})
    (kimi / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="ignoring checkpoint code"):
        check(kimi, hf)
    assert not marker.exists()


def test_router_config_fields():
    base = {"model_type": "deepseek_v2", "n_routed_experts": 8, "num_experts_per_tok": 2}
    spec = router_spec(Config(base))
    got = (spec.score, spec.groups, spec.renormalize, spec.scaling, spec.correction_bias)
    assert got == ("softmax", 1, False, 1.0, False)
    assert router_spec(Config({**base, "norm_topk_prob": True})).renormalize
    v3_spec = router_spec(Config({**base, "model_type": "deepseek_v3", "n_group": 2, "topk_group": 1}))
    got = (v3_spec.score, v3_spec.group_score, v3_spec.renormalize, v3_spec.scaling)
    assert got == ("sigmoid", "top2sum", True, 2.5)
    for bad in ({"topk_method": "mystery"}, {"norm_topk_prob": "yes"}, {"routed_scaling_factor": "2"},
                {"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1},
                {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 5},
                {"num_experts_per_tok": 9}):
        with pytest.raises(wb.CheckpointError):
            router_spec(Config({**base, **bad}))


@pytest.mark.parametrize("n", [1, 3, 9, 10, 61, 100, 109])
def test_mtp_pattern_matches_layers_from_n(n):
    rx = re.compile(_at_least(n))
    assert [i for i in range(300) if rx.fullmatch(str(i))] == list(range(n, 300))


def test_dense_layer_defaults_follow_the_reference_configs():
    """Without first_k_dense_replace, V3-style configs start with 3 dense layers and V2 with none."""
    from workbench.models.deepseek import moe_layers

    base = {"num_hidden_layers": 5}
    assert moe_layers(Config({**base, "model_type": "deepseek_v3"})) == [False] * 3 + [True] * 2
    assert moe_layers(Config({**base, "model_type": "deepseek_v2"})) == [True] * 5
    assert moe_layers(Config({**base, "model_type": "deepseek_v3", "first_k_dense_replace": 1,
                              "moe_layer_freq": 2})) == [False, False, True, False, True]
    assert moe_layers(Config({**base, "model_type": "deepseek_v32",
                              "mlp_layer_types": ["dense", "sparse", "sparse", "dense", "sparse"]})) == \
        [False, True, True, False, True]
    with pytest.raises(wb.CheckpointError, match="mlp_layer_types"):
        moe_layers(Config({**base, "model_type": "deepseek_v32", "mlp_layer_types": ["dense"]}))


def test_rotary_tables_made_once_per_positions_tensor():
    """MLA's rotary, shared by the layers, makes a forward's cos/sin tables once: the same positions tensor gets
    the same tables, an in-place edit or another dtype gets new ones, and inference tensors (no version counter)
    and long sequences are never served from (or held by) the memo."""
    from workbench.models import layers
    from workbench.models.layers import Rotary

    rot = Rotary(8, {"rope_type": "default", "rope_theta": 10000.0})
    pos = torch.arange(3)
    first = rot.cos_sin(pos, torch.float32)
    assert rot.cos_sin(pos, torch.float32) is first
    assert rot.cos_sin(pos, torch.float64)[0].dtype == torch.float64
    pos += 5
    cos, sin = rot.cos_sin(pos, torch.float32)
    assert torch.equal(cos, rot.cos_sin(torch.arange(5, 8), torch.float32)[0]) and not torch.equal(cos, first[0])
    with torch.inference_mode():
        frozen = torch.arange(3)
        assert rot.cos_sin(frozen, torch.float32) is not rot.cos_sin(frozen, torch.float32)
        frozen += 5
        assert torch.equal(rot.cos_sin(frozen, torch.float32)[1], sin)
    long = torch.arange(layers.MEMO_TOKENS + 1)
    assert rot.cos_sin(long, torch.float32) is not rot.cos_sin(long, torch.float32) and rot._last is None
