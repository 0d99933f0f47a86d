"""Each intervention changes what it should, and only that."""

import pytest
import torch
import transformers as tf

import workbench as wb
from workbench import HookError
from workbench.interventions import ablate, force, patch, scale_router_logits

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))


def test_ablate_zero_removes_the_expert(mixtral):
    logits, cache = mixtral.run_with_cache(IDS)
    ids = cache["layers.1.router.topk_ids"]
    e = int(ids[0, 4, 0])  # the top expert of token 4 in sequence 0
    with mixtral.hooks(ablate(1, [e])):
        new, c2 = mixtral.run_with_cache(IDS)
    hit = (ids == e).any(-1)
    # tokens routed to e changed, tokens never routed to e at layer 1 kept their layer-1 output
    assert not torch.allclose(new[0, 4], logits[0, 4])
    keep = ~hit
    torch.testing.assert_close(c2["layers.1.moe.out"][keep], cache["layers.1.moe.out"][keep])
    w2 = c2["layers.1.router.topk_weights"]
    assert (w2[ids == e] == 0).all() and torch.equal(w2[ids != e], cache["layers.1.router.topk_weights"][ids != e])
    # the block output is the hand-computed sum without expert e
    out = cache["layers.1.experts.out"]
    w = cache["layers.1.router.topk_weights"].masked_fill(ids == e, 0)
    torch.testing.assert_close(c2["layers.1.moe.out"], (out * w[..., None]).sum(2))


def test_ablate_token_range_and_reroute(mixtral):
    _, cache = mixtral.run_with_cache(IDS, names=["layers.0.router.topk_ids"])
    ids = cache["layers.0.router.topk_ids"]
    e = int(ids[1, 6, 0])
    with mixtral.hooks(ablate(0, [e], tokens=range(5, 9), mode="reroute")):
        _, c2 = mixtral.run_with_cache(IDS, names=["layers.0.router.topk_ids"])
    new = c2["layers.0.router.topk_ids"]
    assert not (new[:, 5:] == e).any()  # rerouted away inside the range
    assert torch.equal(new[:, :5], ids[:, :5])  # untouched before it
    assert (new[1, 6] != ids[1, 6]).any()


def test_force_routing_matches_hand_computation(mixtral):
    forced = [3, 5]
    with mixtral.hooks(force(2, forced)):
        _, cache = mixtral.run_with_cache(IDS, names=["layers.2.*"])
    assert (cache["layers.2.router.topk_ids"] == torch.tensor(forced)).all()
    # hand computation: renormalised softmax weights of experts 3 and 5, times their SwiGLU outputs
    moe = mixtral.layers["2"].ffn
    x = mixtral.layers["2"].ffn_norm(cache["layers.2.resid_mid"])
    p = cache["layers.2.router.logits"].softmax(-1)[..., forced]
    w = p / p.sum(-1, keepdim=True)
    ex = moe.experts
    outs = [ex.down(e, ex.hidden(e, x.reshape(-1, 32))).view(2, 9, 32) for e in forced]
    torch.testing.assert_close(cache["layers.2.router.topk_weights"], w)
    torch.testing.assert_close(cache["layers.2.moe.out"], w[..., :1] * outs[0] + w[..., 1:] * outs[1])


def test_scale_router_logits(mixtral):
    _, base = mixtral.run_with_cache(IDS, names=["layers.0.router.*"])
    with mixtral.hooks(scale_router_logits(0, 0.0)):
        _, flat = mixtral.run_with_cache(IDS, names=["layers.0.router.*"])
    # zero logits: uniform scores, ties broken towards the lowest expert ids
    assert (flat["layers.0.router.topk_ids"] == torch.tensor([0, 1])).all()
    torch.testing.assert_close(flat["layers.0.router.topk_weights"], torch.full((2, 9, 2), 0.5))
    with mixtral.hooks(scale_router_logits(0, 100.0, experts=[4])):
        _, boosted = mixtral.run_with_cache(IDS, names=["layers.0.router.*"])
    pos = base["layers.0.router.logits"][..., 4] > 0.5
    assert pos.any() and (boosted["layers.0.router.topk_ids"][..., 0][pos] == 4).all()


def test_patch_from_another_run(mixtral):
    other = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(6))
    _, src = mixtral.run_with_cache(other, names=["layers.1.resid_post"])
    _, ref = mixtral.run_with_cache(other)
    with mixtral.hooks(patch("layers.1.resid_post", src["layers.1.resid_post"])):
        patched = mixtral(IDS)
    # everything downstream of a full residual patch equals the source run
    torch.testing.assert_close(patched, ref["logits"])
    with mixtral.hooks(patch("layers.1.resid_post", src["layers.1.resid_post"], tokens=[8])):
        _, part = mixtral.run_with_cache(IDS, names=["layers.1.resid_post"])
    torch.testing.assert_close(part["layers.1.resid_post"][:, 8], src["layers.1.resid_post"][:, 8])
    _, orig = mixtral.run_with_cache(IDS, names=["layers.1.resid_post"])
    torch.testing.assert_close(part["layers.1.resid_post"][:, :8], orig["layers.1.resid_post"][:, :8])


# ---------------------------------------------------------------- refusals and fixes, on every layer kind


def test_expert_ids_a_layer_lacks_are_refused_when_the_hooks_fire(mixtral):
    for hooks in (ablate(1, [6]), ablate(1, [2, 6], mode="reroute"), force(1, [0, 6]),
                  scale_router_logits(1, 2.0, experts=[6])):
        with mixtral.hooks(hooks), pytest.raises(HookError, match=r"at layer 1: expert 6 does not exist.*6 experts"):
            mixtral(IDS)


@pytest.mark.parametrize("make", [
    lambda: ablate(0, [-1]), lambda: ablate(0, [-1], mode="reroute"), lambda: force(0, [-1, 2]),
    lambda: force(0, [3, 3]), lambda: force(0, torch.tensor([[0, 1], [2, 2]])),
    lambda: scale_router_logits(0, 2.0, experts=[-2]), lambda: scale_router_logits(0, float("nan")),
    lambda: ablate(0, [1], tokens=[-1]), lambda: ablate(0, [1], tokens=slice(-3, None)),
    lambda: ablate(0, [1], tokens=range(-2, 3)), lambda: ablate(0, [1], tokens=slice(0, None, 0)),
    lambda: force(0, [0, 1], tokens=torch.tensor([0.0, 1.0])), lambda: patch("logits", torch.zeros(1), tokens=[-1]),
])
def test_arguments_that_cannot_mean_what_they_say_are_refused(make):
    """Negative ids (Python indexing would pick the last expert or no token), repeated forced ids, a NaN factor."""
    with pytest.raises(ValueError):
        make()


def test_reroute_leaving_fewer_than_k_experts_is_refused(mixtral):
    with mixtral.hooks(ablate(0, range(5), mode="reroute")), \
            pytest.raises(HookError, match=r"layer 0: removing 5 of its 6 experts leaves 1, fewer than the k=2"):
        mixtral(IDS)


def test_reroute_and_scale_several_experts_over_a_token_range(mixtral):
    """Every (token, expert) pair of the selection is edited, not the pairs' diagonal."""
    names = ["layers.0.router.*"]
    _, base = mixtral.run_with_cache(IDS, names=names)
    ids = base["layers.0.router.topk_ids"]
    gone = [int(ids[0, 3, 0]), int(ids[0, 3, 1])]
    with mixtral.hooks(ablate(0, gone, tokens=range(2, 7), mode="reroute")):
        _, c = mixtral.run_with_cache(IDS, names=names)
    new = c["layers.0.router.topk_ids"]
    assert not torch.isin(new[:, 2:7], torch.tensor(gone)).any()
    assert torch.equal(new[:, :2], ids[:, :2]) and torch.equal(new[:, 7:], ids[:, 7:])
    with mixtral.hooks(scale_router_logits(0, 0.0, experts=[1, 3], tokens=[2, 4])):
        _, c = mixtral.run_with_cache(IDS, names=names)
    want = base["layers.0.router.logits"].clone()
    want[:, 2:5:2, 1:4:2] = 0
    torch.testing.assert_close(c["layers.0.router.logits"], want, rtol=0, atol=0)


def test_forced_tensor_rows_are_absolute_positions_in_a_chunked_forward(mixtral):
    forced = torch.stack([torch.arange(9) % 6, (torch.arange(9) + 1) % 6], -1)  # [T, k], a different pair per token
    with mixtral.hooks(force(1, forced)):
        whole, cache = mixtral.run_with_cache(IDS[:, :8], names=["layers.1.router.topk_ids"])
        state, parts = wb.State(), []
        for start in (0, 4):
            _, c = mixtral.run_with_cache(IDS[:, start:start + 4], names=["layers.1.router.topk_ids"], cache=state)
            parts.append(c["layers.1.router.topk_ids"])
    assert (cache["layers.1.router.topk_ids"] == forced[:8]).all()
    assert torch.equal(torch.cat(parts, 1), cache["layers.1.router.topk_ids"])
    with mixtral.hooks(force(1, forced[:5])), pytest.raises(HookError, match="do not cover this forward"):
        mixtral(IDS)


def test_patch_refuses_a_pattern_and_a_short_token_mask(mixtral):
    _, src = mixtral.run_with_cache(IDS, names=["layers.1.resid_post"])
    with mixtral.hooks(patch("layers.*.resid_post", src["layers.1.resid_post"])), \
            pytest.raises(HookError, match="is a pattern"):
        mixtral(IDS)
    short = torch.zeros(4, dtype=torch.bool)
    with mixtral.hooks(patch("layers.1.resid_post", src["layers.1.resid_post"], tokens=short)), \
            pytest.raises(HookError, match="mask covers 4 positions"):
        mixtral(IDS)


def test_a_dense_layer_has_no_router_to_intervene_on(tmp_path):
    """A layer number pointing at a dense MLP (DeepSeek's first_k_dense_replace) is refused when attached."""
    from oracle import make_checkpoint

    cfg = tf.DeepseekV3Config(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24,
                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                              num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                              max_position_embeddings=64)
    make_checkpoint(cfg, tmp_path)
    model = wb.load(tmp_path)
    for hooks in (ablate(0, [1]), force(0, [1, 2]), scale_router_logits(0, 2.0)):
        with pytest.raises(KeyError, match=r"no hook point matches 'layers\.0\.router"), model.hooks(hooks):
            pass
    with model.hooks(ablate(1, [1]) + force(1, [1, 2])):
        assert torch.isfinite(model(IDS)).all()


# ---------------------------------------------------------------- embedded DeepSeek-V4: hash and learned layers

HASH, LEARNED = 0, 2  # wb-v4-mini: layers 0-1 hash-routed (tid2eid), 2-5 learned top-k
V4_IDS = torch.tensor([list(b"def add(a, b):\n    return a + b  # sum")])


@pytest.fixture(scope="module")
def v4():
    from workbench.demo import EMBEDDED_MODEL

    model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    assert type(model.layers[str(HASH)].ffn.router).__name__ == "HashRouter"
    assert type(model.layers[str(LEARNED)].ffn.router).__name__ == "Router"
    return model


def test_v4_reroute_on_a_hash_layer_is_refused(v4):
    """Hash routing ignores scores, so the -inf expert stayed selected with weight 0/0 (NaN logits)."""
    _, base = v4.run_with_cache(V4_IDS, names=[f"layers.{HASH}.router.topk_ids"])
    e = int(base[f"layers.{HASH}.router.topk_ids"][0, 3, 0])
    with v4.hooks(ablate(HASH, [e], mode="reroute")), \
            pytest.raises(HookError, match=rf"at layer {HASH}: expert\(s\) \[{e}\] still selected.*mode='zero'"):
        v4(V4_IDS)


def test_v4_reroute_on_a_learned_layer(v4):
    names = [f"layers.{LEARNED}.router.*"]
    logits, base = v4.run_with_cache(V4_IDS, names=names)
    ids = base[f"layers.{LEARNED}.router.topk_ids"]
    gone = ids[0, 5, :2].tolist()
    with v4.hooks(ablate(LEARNED, gone, tokens=range(4, 20), mode="reroute")):
        new_logits, c = v4.run_with_cache(V4_IDS, names=names)
    new = c[f"layers.{LEARNED}.router.topk_ids"]
    assert torch.isfinite(new_logits).all() and not torch.equal(new_logits, logits)
    assert not torch.isin(new[:, 4:20], torch.tensor(gone)).any()
    assert torch.equal(new[:, :4], ids[:, :4]) and torch.equal(new[:, 20:], ids[:, 20:])
    w = c[f"layers.{LEARNED}.router.topk_weights"]
    torch.testing.assert_close(w.sum(-1), torch.full(w.shape[:-1], 1.5))  # renormalised, times the scaling 1.5


@pytest.mark.parametrize("layer", [HASH, LEARNED])
def test_v4_zero_keeps_the_choice_and_the_other_weights(v4, layer):
    names = [f"layers.{layer}.router.*"]
    logits, base = v4.run_with_cache(V4_IDS, names=names)
    ids, w = base[f"layers.{layer}.router.topk_ids"], base[f"layers.{layer}.router.topk_weights"]
    e = int(ids[0, 3, 0])
    with v4.hooks(ablate(layer, [e])):
        new_logits, c = v4.run_with_cache(V4_IDS, names=names)
    w2 = c[f"layers.{layer}.router.topk_weights"]
    assert torch.isfinite(new_logits).all() and not torch.equal(new_logits, logits)
    assert torch.equal(c[f"layers.{layer}.router.topk_ids"], ids)
    assert (w2[ids == e] == 0).all() and torch.equal(w2[ids != e], w[ids != e])


@pytest.mark.parametrize("layer", [HASH, LEARNED])
def test_v4_force_weighs_the_forced_experts_by_the_learned_scores(v4, layer):
    """On a hash layer too: the forced ids replace tid2eid's, the weights are their renormalised scores x 1.5."""
    forced = [1, 7, 12, 30]
    with v4.hooks(force(layer, forced, tokens=slice(2, None))):
        logits, c = v4.run_with_cache(V4_IDS, names=[f"layers.{layer}.router.*"])
    assert torch.isfinite(logits).all()
    ids = c[f"layers.{layer}.router.topk_ids"]
    assert (ids[:, 2:] == torch.tensor(forced)).all() and not (ids[:, :2] == torch.tensor(forced)).all()
    s = c[f"layers.{layer}.router.scores"][:, 2:, forced]
    torch.testing.assert_close(c[f"layers.{layer}.router.topk_weights"][:, 2:], 1.5 * s / s.sum(-1, keepdim=True))


def test_v4_scale_on_a_hash_layer_changes_the_weights_not_the_choice(v4):
    names = [f"layers.{HASH}.router.*"]
    _, base = v4.run_with_cache(V4_IDS, names=names)
    with v4.hooks(scale_router_logits(HASH, 0.0)):
        logits, c = v4.run_with_cache(V4_IDS, names=names)
    assert torch.isfinite(logits).all()
    assert torch.equal(c[f"layers.{HASH}.router.topk_ids"], base[f"layers.{HASH}.router.topk_ids"])
    w = c[f"layers.{HASH}.router.topk_weights"]
    torch.testing.assert_close(w, torch.full_like(w, 1.5 / 4))  # equal scores: uniform over k=4, times 1.5


def test_v4_patch_the_hyper_connection_streams(v4):
    """Residual hooks carry [B, T, hc, H]; a token patch replaces all of that token's streams, only them."""
    other = torch.tensor([list(b"def mul(x, y):\n    return x * y  # product")[:V4_IDS.shape[1]]])
    name = "layers.1.resid_post"
    _, src = v4.run_with_cache(other, names=[name])
    _, orig = v4.run_with_cache(V4_IDS, names=[name])
    assert src[name].shape[2] == 4
    with v4.hooks(patch(name, src[name], tokens=[6])):
        logits, c = v4.run_with_cache(V4_IDS, names=[name])
    assert torch.isfinite(logits).all()
    assert torch.equal(c[name][:, 6], src[name][:, 6])
    keep = torch.arange(V4_IDS.shape[1]) != 6
    assert torch.equal(c[name][:, keep], orig[name][:, keep])
