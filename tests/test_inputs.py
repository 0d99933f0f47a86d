"""Bad model input (ids out of range, empty, wrong dtype or rank) and NaN/Inf in activations."""

import numpy as np
import pytest
import torch

import workbench as wb

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))

BAD_IDS = {
    "id past the vocabulary": (torch.tensor([[1, 2], [3, 96]]), r"token id 96 is outside the vocabulary \[0, 96\) "
                                                                r"\(batch 1, token 1\)"),
    "negative id": (torch.tensor([5, -1, 2]), r"token id -1 is outside the vocabulary \[0, 96\) \(batch 0, token 1\)"),
    "empty sequence": (torch.zeros(1, 0, dtype=torch.long), r"non-empty \[batch, tokens\] tensor, got shape \(1, 0\)"),
    "empty batch": (torch.zeros(0, 4, dtype=torch.long), r"non-empty \[batch, tokens\] tensor, got shape \(0, 4\)"),
    "empty list": ([], r"got shape \(0,\)"),
    "float ids": (torch.ones(1, 3), "integer tensor of token ids, got torch.float32"),
    "bool ids": (torch.ones(1, 3, dtype=torch.bool), "got torch.bool"),
    "numpy float ids": (np.ones(4), "got torch.float64"),
    "rank 3": (torch.zeros(1, 2, 3, dtype=torch.long), r"\[batch, tokens\] tensor, got shape \(1, 2, 3\)"),
    "scalar": (torch.tensor(3), r"got shape \(\)"),
    "text": ("def f():", r"integer token ids \[batch, tokens\], got str"),
    "ragged lists": ([[1, 2], [3]], r"integer token ids \[batch, tokens\], got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_bad_input_ids(mixtral, case):
    ids, message = BAD_IDS[case]
    with pytest.raises(wb.InputError, match=message) as err:
        mixtral(ids)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)  # either may be caught


def test_good_inputs_of_every_form(mixtral):
    ref = mixtral(torch.tensor([[1, 2, 3]]))
    forms = ([1, 2, 3], [[1, 2, 3]], np.array([1, 2, 3], dtype=np.uint8), torch.tensor([1, 2, 3], dtype=torch.int32))
    for ids in forms:
        assert torch.equal(mixtral(ids), ref)


def test_check_finite_passes_a_clean_forward(mixtral):
    with mixtral.check_finite():
        logits = mixtral(IDS)
    assert torch.equal(logits, mixtral(IDS))
    assert not any(hp.active for hp in mixtral._hooks.points.values())


def test_nan_from_a_hook_reported_at_its_point(mixtral):
    def poison(x, ctx):
        x = x.clone()
        x[1, 4, 0] = float("nan")
        return x

    with mixtral.hooks({"layers.1.attn.out": poison}), mixtral.check_finite():
        with pytest.raises(wb.NonFiniteError, match=r"first appear at hook layers.1.attn.out \(layer 1\): 1 NaN and "
                                                    r"0 Inf, the first at batch 1, token position 4") as err:
            mixtral(IDS)
    assert (err.value.hook, err.value.layer, err.value.position) == ("layers.1.attn.out", 1, 4)
    assert not any(hp.active for hp in mixtral._hooks.points.values())


def test_inf_weight_reported_at_the_first_layer_and_hook(mixtral_ckpt):
    """An Inf planted in one expert surfaces first in that layer's experts.out, at the first token routed to it;
    a coarser check names the first residual point after it; the default forward does not check."""
    model = wb.load(mixtral_ckpt[0])
    _, cache = model.run_with_cache(IDS, names=["layers.2.router.topk_ids"])
    ids = cache["layers.2.router.topk_ids"]
    expert = int(ids[0, 0, 0])
    model.layers["2"].ffn.experts.down_proj.data[expert] = float("inf")
    b, t = (ids == expert).any(-1).nonzero()[0].tolist()
    with pytest.raises(wb.NonFiniteError, match=f"hook layers.2.experts.out \\(layer 2\\): .* batch {b}, "
                                                f"token position {t}"):
        with model.check_finite():
            model(IDS)
    with pytest.raises(wb.NonFiniteError, match="hook layers.2.resid_post"):
        with model.check_finite(["layers.*.resid_*", "logits"]):
            model(IDS)
    assert not torch.isfinite(model(IDS)).all()  # opt-in: a plain forward raises nothing


def test_check_finite_reports_absolute_positions(mixtral):
    """Fed chunk by chunk, the reported position is the token's absolute position in the sequence. A hook
    registered inside the block runs after the check of its own point: its Inf is caught at the next one."""
    def poison(x, ctx):
        return x.masked_fill((ctx.positions == 6)[None, :, None], float("inf"))

    state = wb.State()
    with mixtral.hooks({"layers.0.moe.out": poison}), mixtral.check_finite():
        mixtral(IDS[:, :4], cache=state)
        with pytest.raises(wb.NonFiniteError, match="layers.0.moe.out .* token position 6") as err:
            mixtral(IDS[:, 4:], cache=state)
    assert err.value.position == 6
    with mixtral.check_finite(), mixtral.hooks({"layers.0.moe.out": poison}):
        with pytest.raises(wb.NonFiniteError, match="layers.0.resid_post .* 0 NaN and 64 Inf, .* position 6"):
            mixtral(IDS)
