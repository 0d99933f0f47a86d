"""Gradients at hook points (`run_with_cache(grad=True)`) against finite differences, and the expert attributions
of `workbench.attribution` against the ablations and patches they estimate, on tiny float64 checkpoints."""

import pytest
import torch
import transformers as tf

import workbench as wb
from conftest import MIXTRAL
from oracle import fast_backends, input_ids, make_checkpoint
from workbench.attribution import ablation_sweep, attribution_patching, expert_attribution, moe_layers
from workbench.demo import EMBEDDED_MODEL
from workbench.interventions import ablate, patch

VOCAB = 96
V3 = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
          num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
          v_head_dim=12, n_shared_experts=1, max_position_embeddings=256, n_routed_experts=8, num_experts_per_tok=2,
          n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True)
FAMILIES = {"deepseek_v3": lambda: tf.DeepseekV3Config(**V3), "mixtral": lambda: tf.MixtralConfig(**MIXTRAL)}


def metric(logits: torch.Tensor) -> torch.Tensor:
    """A smooth scalar reading every position: a mean log-probability plus a small square term."""
    return logits.log_softmax(-1)[..., 7].mean() + 0.01 * (logits[:, -3:] ** 2).mean()


@pytest.fixture(scope="module", params=list(FAMILIES))
def model64(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make_checkpoint(FAMILIES[request.param](), folder)
    return wb.load(folder, dtype=torch.float64, backend="torch")


def finite_difference(model, ids, name: str, index: tuple, eps: float) -> float:
    """Central difference of `metric` in one coordinate of hook `name`, over the step the tensor's dtype takes;
    asserts the step leaves every layer's top-k selection as it was."""
    _, base = model.run_with_cache(ids, ["layers.*.router.topk_ids"])
    values, steps = [], []
    for sign in (1.0, -1.0):
        def bump(x, ctx):
            y = x.clone()
            y[index] += sign * eps
            steps.append(float(y[index]) - float(x[index]))  # the step as rounded in x's dtype
            return y

        with model.hooks({name: bump}):
            logits, cache = model.run_with_cache(ids, ["layers.*.router.topk_ids"])
        assert all(torch.equal(cache[n], base[n]) for n in base), f"a step on {name} flipped a top-k selection"
        values.append(float(metric(logits)))
    return (values[0] - values[1]) / (steps[0] - steps[1])


def test_gradients_equal_finite_differences(model64):
    ids = input_ids(VOCAB)
    last = max(moe_layers(model64))
    first = min(moe_layers(model64))
    names = [f"layers.{last}.router.topk_weights", f"layers.{first}.experts.out", f"layers.{last}.experts.hidden",
             f"layers.{first}.resid_mid", f"layers.{last}.router.logits"]
    logits, cache, grads = model64.run_with_cache(ids, names + ["layers.*.router.topk_ids"], grad=True, metric=metric)
    assert torch.equal(logits, model64.run_with_cache(ids, [])[0])  # the recorded forward computes the same
    assert not any(n.endswith("topk_ids") for n in grads) and set(names) <= grads.keys()  # selection: no gradient
    for name in names:
        grad = grads[name]
        for i in grad.abs().flatten().topk(3).indices.tolist():  # well above the noise of the fp32 router scores
            index = tuple(torch.unravel_index(torch.tensor(i), grad.shape))
            fd = finite_difference(model64, ids, name, index, 1e-3)  # routers score in fp32: steps well above its ulp
            assert abs(fd - float(grad[index])) <= 5e-5 + 1e-3 * abs(fd), (name, index, fd, float(grad[index]))


def test_gradients_agree_across_backends(model64):
    """The fast backends compute the same gradients (triton runs the grouped backend's torch ops under autograd)."""
    ids = input_ids(VOCAB)
    names = ["layers.*.router.topk_weights", "layers.*.experts.out", "layers.*.resid_post"]
    _, _, ref = model64.run_with_cache(ids, names, grad=True, metric=metric)
    try:
        for backend in fast_backends():
            for m in model64.modules():
                if hasattr(m, "backend"):
                    m.backend = backend
            _, _, got = model64.run_with_cache(ids, names, grad=True, metric=metric)
            assert got.keys() == ref.keys()
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12, msg=lambda m: f"{backend} {n}: {m}")
    finally:
        for m in model64.modules():
            if hasattr(m, "backend"):
                m.backend = "torch"


def test_grad_mode_arguments_and_side_effects(mixtral):
    ids = input_ids(MIXTRAL["vocab_size"])
    with pytest.raises(ValueError, match="grad=True together with metric"):
        mixtral.run_with_cache(ids, grad=True)
    with pytest.raises(ValueError, match="grad=True together with metric"):
        mixtral.run_with_cache(ids, metric=metric)
    with pytest.raises(ValueError, match="floating scalar"):
        mixtral.run_with_cache(ids, ["logits"], grad=True, metric=lambda logits: logits)
    _, cache, grads = mixtral.run_with_cache(ids, ["logits", "layers.0.resid_pre"], grad=True,
                                             metric=lambda logits: logits[0, 2, 5])
    assert all(p.grad is None and not p.requires_grad for p in mixtral.parameters())
    assert not any(t.requires_grad for t in [*cache.values(), *grads.values()]) and torch.is_grad_enabled()
    expected = torch.zeros_like(grads["logits"])
    expected[0, 2, 5] = 1
    assert torch.equal(grads["logits"], expected)
    assert grads["layers.0.resid_pre"][:, 3:].abs().max() == 0 and grads["layers.0.resid_pre"][0, :3].abs().max() > 0


def linear_head(model):
    """Hooks making the logits a linear function of the last layer's output (the final norm bypassed), so a metric
    linear in the logits is linear in that layer's expert outputs and first-order estimates there are exact."""
    last = max(int(i) for i in model.layers)
    seen = {}

    def keep(x, ctx):
        seen["x"] = x

    return [(f"layers.{last}.resid_post", keep), ("final.norm_out", lambda x, ctx: seen["x"])]


def linear_metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[..., 3].sum() - 0.5 * logits[:, 4:, 11].sum()


def test_attribution_is_exact_where_the_metric_is_linear(model64):
    ids = input_ids(VOCAB)
    last = max(moe_layers(model64))
    with model64.hooks(linear_head(model64)):
        est = expert_attribution(model64, ids, linear_metric)
        per_token = expert_attribution(model64, ids, linear_metric, per_token=True)
        exact = ablation_sweep(model64, ids, linear_metric, progress=False)
    assert est.dims == ("layer", "expert") and list(est.layer) == list(moe_layers(model64))
    assert per_token.dims == ("token", "layer", "expert") and per_token.sizes["token"] == ids.shape[1]
    torch.testing.assert_close(torch.tensor(per_token.sum("token").values), torch.tensor(est.values))
    torch.testing.assert_close(torch.tensor(est.sel(layer=last).values), torch.tensor(exact.sel(layer=last).values),
                               rtol=1e-6, atol=1e-9)  # the top-k weights and their gradients are fp32
    assert (exact.sel(layer=last) != 0).sum() > 2  # not vacuous


def test_sweep_equals_ablate_calls(mixtral):
    ids = input_ids(MIXTRAL["vocab_size"])
    exact = ablation_sweep(mixtral, ids, metric, progress=False)
    with torch.no_grad():
        clean = float(metric(mixtral(ids)))
        for layer, e in [(0, 1), (2, 4), (1, 0)]:
            with mixtral.hooks(ablate(layer, [e])):
                assert float(exact.sel(layer=layer, expert=e)) == float(metric(mixtral(ids))) - clean
    some = ablation_sweep(mixtral, ids, metric, layers=[2, 0], progress=False)
    assert some.layer.values.tolist() == [0, 2] and some.equals(exact.sel(layer=[0, 2]))
    with pytest.raises(ValueError, match=r"MoE layers \[0, 1, 2\]"):
        ablation_sweep(mixtral, ids, metric, layers=[3], progress=False)


def test_attribution_patching(model64):
    """Patching the last layer's block output is linear under `linear_head`: the estimate is the effect; per expert,
    the routed experts' estimates add up to the block output's less the shared expert's."""
    clean, corrupt = input_ids(VOCAB), input_ids(VOCAB, seed=7)
    last = max(moe_layers(model64))
    name = f"layers.{last}.moe.out"
    with model64.hooks(linear_head(model64)):
        shared_names = [n for n in model64.hook_names if n == f"layers.{last}.shared.out"]
        got = attribution_patching(model64, clean, corrupt, linear_metric, [name, *shared_names])
        _, src = model64.run_with_cache(corrupt, [name])
        with torch.no_grad():
            base = float(linear_metric(model64(clean)))
            for t in (0, 5):
                with model64.hooks(patch(name, src[name], tokens=[t])):
                    effect = float(linear_metric(model64(clean))) - base
                assert abs(float(got.points.sel(hook=name, token=t)) - effect) <= 1e-9 * max(1, abs(effect))
    routed = got.experts.sel(layer=last).sum("expert")
    shared = got.points.sel(hook=shared_names[0]) if shared_names else 0
    torch.testing.assert_close(torch.tensor((routed + shared).values), torch.tensor(got.points.sel(hook=name).values))
    with pytest.raises(ValueError, match="one shape"):
        attribution_patching(model64, clean, corrupt[:, :5], linear_metric)


def test_embedded_model_attribution():
    """DeepSeek-V4 (hash-routed first layers, hyper-connections): labelled estimates for every layer and expert."""
    model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    ids = torch.tensor(model.tokenizer.encode("def add(a, b):\n    return a + b\n"))[None]
    est = expert_attribution(model, ids, lambda logits: logits[0, -1].log_softmax(-1)[ids[0, -1]])
    assert est.sizes == {"layer": 6, "expert": 32} and est.notnull().all() and (est != 0).sum() > 6


def test_local_attribution_is_exact_at_the_last_layer(model64):
    """After the last MoE layer nothing passes between positions, so under a metric summed over positions (nonlinear
    in the logits) method="local" is the sweep there, where the gradient estimate is not."""
    ids = input_ids(VOCAB)
    last = max(moe_layers(model64))
    exact = ablation_sweep(model64, ids, metric, progress=False).sel(layer=last).values
    local = expert_attribution(model64, ids, metric, method="local")
    per_token = expert_attribution(model64, ids, metric, method="local", per_token=True)
    gradient = expert_attribution(model64, ids, metric).sel(layer=last).values
    assert local.attrs["estimate"].startswith("exact at each token's own position")
    torch.testing.assert_close(torch.tensor(per_token.sum("token").values), torch.tensor(local.values))
    error = abs(local.sel(layer=last).values - exact).max()
    assert error <= 1e-6 * abs(exact).max(), error  # the top-k weights are fp32
    assert abs(gradient - exact).max() > 100 * error and (exact != 0).sum() > 2  # not vacuous
    with pytest.raises(ValueError, match="'gradient' or 'local'"):
        expert_attribution(model64, ids, metric, method="hessian")
