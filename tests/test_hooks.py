"""Hook vocabulary, run_with_cache, replacement, errors, and the no-extra-work guarantee."""

import pytest
import torch

import workbench as wb
import workbench.hooks

IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))


def test_hook_names_follow_design(mixtral):
    names = mixtral.hook_names
    per_layer = ["resid_pre", "attn.out", "resid_mid", "router.logits", "router.scores", "router.margin",
                 "router.topk_ids", "router.topk_weights", "experts.hidden", "experts.out", "moe.out", "resid_post"]
    assert names == [f"layers.{i}.{n}" for i in range(3) for n in per_layer] + ["final.norm_out", "logits"]


def test_cache_shapes_and_consistency(mixtral):
    logits, cache = mixtral.run_with_cache(IDS)
    B, T, H, k, I = 2, 7, 32, 2, 48
    assert cache["layers.1.router.logits"].shape == (B, T, 6)
    assert cache["layers.1.router.topk_ids"].shape == (B, T, k) and cache["layers.1.router.topk_ids"].dtype == torch.long
    assert cache["layers.1.experts.hidden"].shape == (B, T, k, I)
    assert cache["layers.1.experts.out"].shape == (B, T, k, H)
    assert torch.equal(cache["logits"], logits)
    # residual bookkeeping: post = mid + moe.out, mid = pre + attn.out
    torch.testing.assert_close(cache["layers.1.resid_post"], cache["layers.1.resid_mid"] + cache["layers.1.moe.out"])
    torch.testing.assert_close(cache["layers.1.resid_mid"], cache["layers.1.resid_pre"] + cache["layers.1.attn.out"])
    # moe.out is exactly the weighted sum of per-expert outputs
    w = cache["layers.1.router.topk_weights"]
    torch.testing.assert_close((cache["layers.1.experts.out"] * w[..., None]).sum(2), cache["layers.1.moe.out"])
    # Mixtral weights: renormalised softmax probabilities of the selected experts
    probs = cache["layers.1.router.logits"].softmax(-1).gather(-1, cache["layers.1.router.topk_ids"])
    torch.testing.assert_close(w, probs / probs.sum(-1, keepdim=True))
    # caching does not change the result
    assert torch.equal(mixtral(IDS), logits)


def test_globs_and_subset(mixtral):
    _, cache = mixtral.run_with_cache(IDS, names=["layers.2.router.*", "logits"])
    kinds = ("logits", "scores", "margin", "topk_ids", "topk_weights")
    assert list(cache) == [f"layers.2.router.{n}" for n in kinds] + ["logits"]
    with pytest.raises(KeyError, match="did you mean"):
        mixtral.run_with_cache(IDS, names=["layers.2.router.topk_id"])


def test_replacement_and_context(mixtral):
    seen = []

    def zero_attn(x, ctx):
        seen.append((ctx.name, ctx.layer, ctx.positions.tolist(), ctx.input_ids.shape))
        return torch.zeros_like(x)

    with mixtral.hooks({"layers.0.attn.out": zero_attn}):
        _, cache = mixtral.run_with_cache(IDS, names=["layers.0.*"])
    assert seen == [("layers.0.attn.out", 0, list(range(7)), (2, 7))]
    assert torch.equal(cache["layers.0.resid_mid"], cache["layers.0.resid_pre"])
    assert not mixtral._hooks.points["layers.0.attn.out"].active


def test_hooks_removed_on_exception(mixtral):
    def boom(x, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with mixtral.hooks({"layers.*.moe.out": boom}):
            mixtral(IDS)
    assert not any(hp.active for hp in mixtral._hooks.points.values())


def test_wrong_shape_names_the_hook(mixtral):
    with pytest.raises(wb.HookError, match="layers.1.router.topk_ids.*shape \\(2, 7, 3\\).*expected \\(2, 7, 2\\)"):
        with mixtral.hooks({"layers.1.router.topk_ids": lambda x, ctx: torch.zeros(2, 7, 3, dtype=torch.long)}):
            mixtral(IDS)
    with pytest.raises(wb.HookError, match="returned str"):
        with mixtral.hooks({"logits": lambda x, ctx: "nope"}):
            mixtral(IDS)


def test_wrong_dtype_kind_names_the_hook(mixtral):
    """A replacement may change precision (cast back) but not kind: float ids or integer activations are refused."""
    with pytest.raises(wb.HookError, match="hook on 'layers.0.router.topk_ids' returned dtype torch.float32; "
                                           "expected torch.int64 \\(integer values"):
        with mixtral.hooks({"layers.0.router.topk_ids": lambda x, ctx: x.float()}):
            mixtral(IDS)
    with pytest.raises(wb.HookError, match="'layers.2.resid_post' returned dtype torch.int64; expected torch.float32"):
        with mixtral.hooks({"layers.2.resid_post": lambda x, ctx: x.long()}):
            mixtral(IDS)
    with mixtral.hooks({"layers.2.resid_post": lambda x, ctx: x.double()}):
        assert mixtral(IDS).dtype == torch.float32
    assert not any(hp.active for hp in mixtral._hooks.points.values())


def test_no_hooks_no_extra_work(mixtral, monkeypatch):
    """Unhooked: no hook context is ever built and no per-expert buffer is allocated."""
    def fail(*a, **k):
        raise AssertionError("HookContext built with no hook registered")

    monkeypatch.setattr(workbench.hooks, "HookContext", fail)
    calls = []
    real = torch.Tensor.new_zeros
    monkeypatch.setattr(torch.Tensor, "new_zeros", lambda self, *s, **k: calls.append(s) or real(self, *s, **k))
    mixtral(IDS)
    assert calls == []


def test_bad_inputs(mixtral):
    """A few bad inputs (tests/test_inputs.py has the full table): both ValueError and TypeError catch them."""
    with pytest.raises(ValueError, match="token id 96 is outside"):
        mixtral(torch.tensor([[1, 96]]))
    with pytest.raises(ValueError, match="token id -1"):
        mixtral(torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        mixtral(torch.ones(1, 3))
    with pytest.raises(ValueError, match="non-empty"):
        mixtral(torch.zeros(1, 0, dtype=torch.long))
    assert mixtral(torch.tensor([1, 2, 3])).shape == (1, 3, 96)


def test_per_expert_replacements_change_the_block(mixtral):
    """Editing experts.hidden / experts.out changes what the MoE block outputs, slot by slot."""
    _, base = mixtral.run_with_cache(IDS, names=["layers.1.*"])
    with mixtral.hooks({"layers.1.experts.out": lambda x, ctx: 2 * x}):
        _, doubled = mixtral.run_with_cache(IDS, names=["layers.1.moe.out"])
    torch.testing.assert_close(doubled["layers.1.moe.out"], 2 * base["layers.1.moe.out"])

    def drop_slot1(h, ctx):
        assert ctx.extra["topk_ids"].shape == h.shape[:3]
        h = h.clone()
        h[:, :, 1] = 0
        return h

    with mixtral.hooks({"layers.1.experts.hidden": drop_slot1}):
        _, c = mixtral.run_with_cache(IDS, names=["layers.1.experts.out", "layers.1.moe.out"])
    assert (c["layers.1.experts.out"][:, :, 1] == 0).all()  # Mixtral experts have no bias
    w = base["layers.1.router.topk_weights"]
    torch.testing.assert_close(c["layers.1.moe.out"], w[..., 0:1] * base["layers.1.experts.out"][:, :, 0])
