"""Each intervention changes what it should, and only that."""

import torch

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
