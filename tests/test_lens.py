"""Direct logit attribution and the logit lens (workbench.lens), steering and boosting (workbench.interventions)."""

import numpy as np
import pytest
import torch
import xarray as xr

import workbench as wb
from workbench import HookError, InputError
from workbench.interventions import boost, steer
from workbench.lens import direct_logit_attribution, logit_lens
from oracle import input_ids, make_checkpoint
from test_deepseek import v3
from test_deepseek_v4 import CONFIGS as V4_CONFIGS, make_v4
from test_gpt_oss import config as gpt_oss
from test_qwen_olmoe import qwen2

V4 = "hc2-every-kind-rates-not-dividing-yarn"  # hc_mult 2; sliding, CSA and HCA layers; hash and learned routing


@pytest.fixture(scope="module")
def embedded():
    from workbench.demo import EMBEDDED_MODEL

    return wb.load(EMBEDDED_MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek-v4")
    make_v4(V4_CONFIGS[V4][0](), folder)
    return wb.load(folder)


@pytest.fixture(scope="module", params=["mixtral", "deepseek-v3", "deepseek-v4", "qwen2-moe", "gpt-oss", "embedded"])
def model(request, tmp_path_factory):
    """fp32 models of every residual layout: plain, dense first layer + shared expert (V3), gated shared expert
    (Qwen), expert biases (GPT-OSS), hyper-connection streams (V4: a tiny one and the embedded model)."""
    fixture = {"mixtral": "mixtral", "deepseek-v4": "v4", "embedded": "embedded"}.get(request.param)
    if fixture:
        return request.getfixturevalue(fixture)
    folder = tmp_path_factory.mktemp(request.param)
    make_checkpoint({"deepseek-v3": lambda: v3(first_k_dense_replace=1), "qwen2-moe": qwen2,
                     "gpt-oss": gpt_oss}[request.param](), folder)
    return wb.load(folder)


def ids_for(model, length: int = 13) -> torch.Tensor:
    return input_ids(model.vocab_size, length=length)[:1]


def test_contributions_sum_to_the_logit(model):
    ids = ids_for(model)
    logits, cache = model.run_with_cache(ids, names=["layers.*.router.topk_ids"])
    for position, target in ((-1, int(logits[0, -1].argmax())), (5, 7)):
        dla = direct_logit_attribution(model, ids, target, position=position)
        assert dla.attrs["logit"] == pytest.approx(float(logits[0, position, target]), abs=1e-6)
        assert abs(float(dla.sum()) - dla.attrs["logit"]) < 1e-4
        assert dla.attrs["position"] == position % 13 and dla.attrs["token_id"] == int(ids[0, position])
        # one component per embedding, attention, dense MLP, shared expert and routed slot, labelled
        names, kinds = set(model.hook_names), list(dla.kind.values)
        assert kinds[0] == "embed" and kinds.count("attn") == len(model.layers)
        assert kinds.count("mlp") == sum(n.endswith(".mlp.out") for n in names)
        assert kinds.count("shared") == sum(n.endswith(".shared.out") for n in names)
        experts = dla.where(dla.kind == "expert", drop=True)
        routed = [(int(n.split(".")[1]), e) for n, c in cache.items() for e in c[0, position].tolist()]
        assert list(zip(experts.layer.values.tolist(), experts.expert.values.tolist())) == routed
        assert float(dla.groupby("kind").sum().sum()) == pytest.approx(float(dla.sum()), abs=1e-5)


def test_attribution_reads_the_forward_it_runs(mixtral):
    """An ablated expert's slot contributes nothing; the rest still sum to the changed logit."""
    from workbench.interventions import ablate

    ids = ids_for(mixtral)
    base = direct_logit_attribution(mixtral, ids, 3)
    e = int(base.where(base.kind == "expert", drop=True).expert[0])
    with mixtral.hooks(ablate(0, [e])):
        dla = direct_logit_attribution(mixtral, ids, 3)
        logit = float(mixtral(ids)[0, -1, 3])
    assert float(dla.sel(component=f"layers.0.expert.{e}")) == 0.0
    assert abs(float(dla.sum()) - logit) < 1e-4 and dla.attrs["logit"] == pytest.approx(logit, abs=1e-6)


def test_attribution_refuses_what_it_cannot_mean(mixtral):
    ids = ids_for(mixtral)
    with pytest.raises(InputError, match="outside the vocabulary"):
        direct_logit_attribution(mixtral, ids, mixtral.vocab_size)
    with pytest.raises(InputError, match="position 13 is outside the sequence of 13 tokens"):
        direct_logit_attribution(mixtral, ids, 0, position=13)
    with pytest.raises(InputError, match="one sequence at a time"):
        direct_logit_attribution(mixtral, input_ids(mixtral.vocab_size), 0)


def test_logit_lens_ends_at_the_models_own_prediction(model):
    ids = ids_for(model)
    lens = logit_lens(model, ids, top=3)
    assert lens.top_ids.dims == ("layer", "token", "rank") and list(lens.layer.values) == [int(i) for i in model.layers]
    assert lens.sizes == {"layer": len(model.layers), "token": 13, "rank": 3}
    probs, top = model(ids)[0].softmax(-1).topk(3, dim=-1)
    last = lens.isel(layer=-1)
    assert np.array_equal(last.top_ids.values, top.numpy())
    np.testing.assert_allclose(last.top_probs.values, probs.numpy(), atol=1e-6)
    assert np.array_equal(lens.input_ids.values, ids[0].numpy())
    assert (np.diff(lens.top_probs.values, axis=-1) <= 0).all()


def test_logit_lens_of_chosen_layers(mixtral):
    lens = logit_lens(mixtral, ids_for(mixtral), layers=[1], top=1)
    assert list(lens.layer.values) == [1] and lens.sizes["rank"] == 1
    with pytest.raises(ValueError, match=r"no layer \[7\]"):
        logit_lens(mixtral, ids_for(mixtral), layers=[7])


# ---------------------------------------------------------------- steering and boosting


@pytest.mark.parametrize("which", ["mixtral", "v4"])
def test_steering_adds_exactly_the_vector(request, which):
    model = request.getfixturevalue(which)
    ids, name = ids_for(model), "layers.1.resid_post"
    logits, base = model.run_with_cache(ids, names=[name])
    shape = base[name].shape[2:]  # [H], V4: [hc_mult, H]
    with model.hooks(steer(name, torch.zeros(shape))):
        same, zero = model.run_with_cache(ids, names=[name])
    assert torch.equal(same, logits) and torch.equal(zero[name], base[name])
    v = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with model.hooks(steer(name, v.numpy(), scale=2.0, tokens=[2, 5])):
        moved, cache = model.run_with_cache(ids, names=[name, "layers.0.resid_post"])
    delta = cache[name] - base[name]
    torch.testing.assert_close(delta[0, [2, 5]], 2 * v.expand(2, *shape), rtol=0, atol=1e-5)
    assert torch.equal(delta[0, [0, 1, 3, 4, 6]], torch.zeros_like(delta[0, [0, 1, 3, 4, 6]]))
    assert not torch.equal(moved[0, 5:], logits[0, 5:]) and torch.equal(moved[0, :2], logits[0, :2])


def test_steering_one_vector_into_every_stream(v4):
    ids, name = ids_for(v4), "layers.2.resid_mid"
    _, base = v4.run_with_cache(ids, names=[name])
    v = torch.ones(base[name].shape[-1])
    with v4.hooks(steer(name, v)):
        _, cache = v4.run_with_cache(ids, names=[name])
    torch.testing.assert_close(cache[name] - base[name], v.expand_as(base[name]), rtol=0, atol=1e-5)


def test_steering_refuses_what_it_cannot_mean(mixtral):
    ids, H = ids_for(mixtral), mixtral.embed.weight.shape[1]
    with mixtral.hooks(steer("layers.0.attn.out", torch.ones(H))), \
            pytest.raises(HookError, match="'layers.0.attn.out' is not a residual-stream hook point"):
        mixtral(ids)
    with mixtral.hooks(steer("layers.0.resid_pre", torch.ones(H + 1))), \
            pytest.raises(HookError, match=r"shape \(33,\) does not fit 'layers.0.resid_pre'"):
        mixtral(ids)
    with mixtral.hooks(steer("layers.0.resid_pre", torch.ones(2, H))), pytest.raises(HookError, match="does not fit"):
        mixtral(ids)
    for bad in (dict(vector=torch.ones(H), scale=float("nan")), dict(vector=torch.tensor([1.0, float("inf")])),
                dict(vector=torch.ones(H, dtype=torch.long)), dict(vector=torch.tensor(1.0))):
        with pytest.raises(ValueError):
            steer("layers.0.resid_pre", **bad)


def test_a_steering_vector_from_stored_activations(mixtral, tmp_path):
    """The README's recipe: the mean difference of resid_post between two labelled sets of stored tokens."""
    ids = input_ids(mixtral.vocab_size, length=40)[0]
    ds = wb.open_store(mixtral.trace(ids, out=tmp_path / "run.zarr", names=["layers.1.resid_post"], progress=False))
    first = xr.DataArray(np.arange(40) < 20, dims="token")  # e.g. one domain's tokens
    resid = ds.resid_post.sel(layer=1)
    v = (resid.where(first).mean("token") - resid.where(~first).mean("token")).values
    _, cache = mixtral.run_with_cache(ids[None], names=["layers.1.resid_post"])
    r = cache["layers.1.resid_post"][0]
    torch.testing.assert_close(torch.as_tensor(v), r[:20].mean(0) - r[20:].mean(0), rtol=0, atol=1e-5)
    with mixtral.hooks(steer("layers.1.resid_post", v, scale=0.5)):
        mixtral(ids)


def test_boost_raises_the_chosen_experts(mixtral):
    ids, layer = ids_for(mixtral), 1
    names = [f"layers.{layer}.router.*"]
    _, base = mixtral.run_with_cache(ids, names=names)
    e = int(base[f"layers.{layer}.router.scores"][0].mean(0).argmin())  # the expert chosen least
    with mixtral.hooks(boost(layer, [e], 50.0, tokens=range(3, 9))):
        _, c = mixtral.run_with_cache(ids, names=names)
    ids_after = c[f"layers.{layer}.router.topk_ids"][0]
    assert (ids_after[3:9, 0] == e).all()  # ranked first where boosted, elsewhere as before
    assert torch.equal(ids_after[:3], base[f"layers.{layer}.router.topk_ids"][0, :3])
    logits = base[f"layers.{layer}.router.logits"]
    torch.testing.assert_close(c[f"layers.{layer}.router.logits"][0, 3:9, e], logits[0, 3:9, e] + 50.0)
    with mixtral.hooks(boost(layer, [e], 0.0)):  # no change
        _, same = mixtral.run_with_cache(ids, names=names)
    assert torch.equal(same[f"layers.{layer}.router.logits"], logits)
    with mixtral.hooks(boost(layer, [99], 1.0)), pytest.raises(HookError, match="expert 99 does not exist"):
        mixtral(ids)
    with pytest.raises(ValueError, match="bias must be finite"):
        boost(layer, [0], float("inf"))
