"""DeepSeek-V3.2 (DSA: lightning indexer over MLA) against the oracle, its indexer hook, and chunked decoding."""

import re

import pytest
import torch
import transformers as tf

import workbench as wb
from oracle import T, assert_chunked_equals_whole, assert_parity, input_ids, make_checkpoint, routing_is_nontrivial

VOCAB = 96
TOPK = 4  # with T = 13 most queries see more keys than the indexer keeps
# Exact-zero index scores (every head's ReLU clipped) tie; we keep the earlier key, torch.topk's choice is
# unspecified. 16 indexer heads make such ties improbable in these tiny models (4 heads hit them).
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, mscale=1.0, mscale_all_dim=0.7,
            original_max_position_embeddings=32, beta_fast=32, beta_slow=1)


def v32(**kw) -> tf.DeepseekV32Config:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=12, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
                n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                index_topk=TOPK, index_head_dim=16, index_n_heads=16, max_position_embeddings=256)
    return tf.DeepseekV32Config(**{**base, **kw})


def oracle_selection(hf, ids) -> dict[int, torch.Tensor]:
    """The key indices the oracle's indexer keeps, per layer [B, T, k]."""
    got, handles = {}, []
    for name, mod in hf.named_modules():
        m = re.search(r"layers\.(\d+)\.self_attn\.indexer$", name)
        if m:
            def keep(mod, args, out, i=int(m[1])):
                got[i] = out.detach().long()
            handles.append(mod.register_forward_hook(keep))
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("name,config", [
    ("topk4", lambda: v32()),
    ("topk6-groups", lambda: v32(index_topk=6, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)),
    ("topk3-yarn", lambda: v32(index_topk=3, rope_parameters=YARN)),
    ("dense-topk", lambda: v32(index_topk=64)),
])
def test_parity(tmp_path, name, config):
    hf = make_checkpoint(config(), tmp_path)
    out = assert_parity(tmp_path, hf, VOCAB)
    assert routing_is_nontrivial(out["cache"])
    names = out["model"].hook_names
    assert "layers.0.mlp.out" in names and "layers.1.shared.out" in names
    assert names.index("layers.1.attn.indexer_topk") < names.index("layers.1.attn.out")


def test_indexer_hook_matches_oracle(tmp_path):
    hf = make_checkpoint(v32(), tmp_path)
    ids = input_ids(VOCAB)
    ref = oracle_selection(hf, ids)
    model = wb.load(tmp_path, dtype=torch.float32)
    _, cache = model.run_with_cache(ids, names=["layers.*.attn.indexer_topk"])
    assert sorted(ref) == [0, 1, 2]
    pos = torch.arange(T)
    for i, theirs in ref.items():
        ours = cache[f"layers.{i}.attn.indexer_topk"]
        assert ours.shape == (2, T, TOPK) and not ours.dtype.is_floating_point
        assert ((ours <= pos[None, :, None]) & (ours >= -1)).all(), "non-causal key selected"
        # early queries keep every earlier key and pad with -1
        assert (ours[:, : TOPK - 1] == -1).sum() == 2 * sum(TOPK - 1 - t for t in range(TOPK - 1))
        for b in range(2):
            for t in range(T):
                mine = {int(p) for p in ours[b, t] if p >= 0}
                oracle = {int(p) for p in theirs[b, t] if p <= t}
                assert mine == oracle, f"layer {i} batch {b} query {t}: ours {mine}, oracle {oracle}"
        # the selection really bites: late queries drop some of their causal keys
        assert (ours[:, TOPK:] >= 0).all()


def test_indexer_hook_steers_attention(tmp_path):
    make_checkpoint(v32(), tmp_path)
    model = wb.load(tmp_path, dtype=torch.float32)
    ids = input_ids(VOCAB)
    base = model(ids)

    def only_self(x, ctx):
        out = torch.full_like(x, -1)
        out[..., 0] = ctx.positions
        return out

    with model.hooks({"layers.*.attn.indexer_topk": only_self}):
        steered = model(ids)
    assert torch.allclose(steered[:, 0], base[:, 0], atol=1e-5)  # query 0 sees only itself anyway
    assert not torch.allclose(steered[:, -1], base[:, -1], atol=1e-3)


def test_chunked_equals_whole(tmp_path):
    make_checkpoint(v32(), tmp_path)
    model = wb.load(tmp_path)
    names = [n for n in model.hook_names if n.endswith(("topk_ids", "indexer_topk"))]
    state = assert_chunked_equals_whole(model, input_ids(VOCAB), names)
    assert set(state.layers["1"]) == {"pos", "latent", "k_rope", "index_k"}
    assert state.layers["1"]["index_k"].shape == (2, 1, T, 16)  # index_head_dim, one shared key


def test_needs_q_lora(tmp_path):
    make_checkpoint(v32(), tmp_path)
    from workbench.config import Config
    from workbench.models import deepseek_v32

    cfg = Config.read(tmp_path / "config.json")
    cfg.data["q_lora_rank"] = None
    with pytest.raises(wb.CheckpointError, match="q_lora_rank"):
        deepseek_v32.build(cfg)
