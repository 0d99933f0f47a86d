"""Attribution of a metric on the logits to experts and hook points: first-order estimates from one forward and one
backward (`CausalLM.run_with_cache(grad=True)`), one corrected at each token's own position, and the exact
ablation sweep they estimate (README, "Gradients and attribution").

Every result is a labelled xarray object: layers are the checkpoint's numbers, experts the router's ids, tokens
the positions of the input (summed over its batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import xarray as xr
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .hooks import match
from .interventions import ablate
from .models.base import CausalLM
from .models.moe import Router
from .schema import layer_of

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [B, T, vocab] -> a scalar tensor

ABLATION = "ablate(layer, [expert], mode='zero') at every position: the expert's weight set to 0 where selected"


def moe_layers(model: CausalLM) -> dict[int, int]:
    """{layer: routed expert count} of the model's MoE layers, in forward order."""
    return {layer_of(n): m.spec.experts for n, m in model.named_modules() if isinstance(m, Router)}


def expert_attribution(model: CausalLM, ids: torch.Tensor, metric: Metric, *, per_token: bool = False,
                       method: str = "gradient") -> xr.DataArray:
    """Estimate of metric(ablated) - metric(clean) for each (layer, expert) ablated as `ablate` does by default
    (weight 0 wherever selected, the other weights unchanged), without a forward per expert.

    method="gradient" (one forward and one backward): at each token and slot choosing the expert, -w * dmetric/dw
    for its top-k weight w, which is -(gradient at the slot's weighted output) . (its weighted output); summed over
    the tokens routed to it. method="local" adds, for each token, the exact nonlinear part of the metric's change at
    the token's own position (see `_local_correction`; 2 * k extra passes per MoE layer, however many experts).
    Returns [layer, expert], or [token, layer, expert] with `per_token`.
    """
    if method not in ("gradient", "local"):
        raise ValueError(f"expert_attribution: method must be 'gradient' or 'local', got {method!r}")
    layers = moe_layers(model)
    names = [f"layers.{i}.router.{p}" for i in layers for p in ("topk_ids", "topk_weights")] + ["logits"]
    logits, cache, grads = model.run_with_cache(ids, names, grad=True, metric=metric)
    B, T = logits.shape[:2]
    est = torch.zeros(T, len(layers), max(layers.values()), dtype=torch.float64)
    for j, i in enumerate(layers):
        w, chosen = f"layers.{i}.router.topk_weights", cache[f"layers.{i}.router.topk_ids"]
        effect = -(cache[w].double() * grads[w].double())  # [B, T, k]
        if method == "local":
            effect += _local_correction(model, ids, metric, i, chosen.shape[-1], logits, grads["logits"])
        est[:, j] = est.new_zeros(B, T, est.shape[-1]).scatter_add_(-1, chosen.cpu(), effect.cpu()).sum(0)
    with torch.no_grad():
        value = float(metric(logits))
    estimate = {"gradient": "first order (gradient x weight)",
                "local": "exact at each token's own position, first order across positions"}[method]
    out = _labelled(est.numpy(), layers, "expert_attribution", metric=value, ablation=ABLATION, estimate=estimate)
    return out if per_token else out.sum("token", keep_attrs=True)


def _local_correction(model: CausalLM, ids: torch.Tensor, metric: Metric, layer: int, k: int, logits: torch.Tensor,
                      dlogits: torch.Tensor) -> torch.Tensor:
    """[B, T, k] to add to the gradient estimate at each (token, slot) of MoE layer `layer`: the exact change of the
    metric from the token's own position's logits when its slot is zeroed, less that change to first order.

    Per slot: one forward with the slot zeroed at every token (the logits each position then gets, later layers
    free to re-route), and the derivative of the logits along that ablation (a forward and two backwards, attention
    on the math backend: the fused kernels have no double backward). At
    position t, the metric with only t's logits replaced, less the clean metric, is the exact own-position change;
    dmetric/dlogits[t] . dlogits[t] is its first-order part. Exact where the ablation's nonlinearity stays at the
    token's own position (the last MoE layer, under a metric summed over positions) and what passes between
    positions is linear. Costs B * T calls of the metric on logits per slot.
    """
    name, first = f"layers.{layer}.router.topk_weights", model.hook_names[0]
    clean = logits.detach()
    with torch.no_grad():
        base = float(metric(clean))
    out = torch.zeros(*clean.shape[:2], k, dtype=torch.float64, device=clean.device)
    for s in range(k):
        slot = torch.zeros(k)
        slot[s] = 1.0

        def scaled(u: torch.Tensor) -> list[tuple[str, Callable]]:
            """Hooks scaling slot s's weight by 1 - u at every token (u = 1: zeroed)."""
            return [(name, lambda w, ctx: w * (1 - u.to(w.dtype) * slot.to(w.device, w.dtype)))]

        with torch.no_grad(), model.hooks(scaled(torch.tensor(1.0))):
            ablated = model(ids)
        u = torch.zeros((), dtype=torch.float64, requires_grad=True)
        record = [(first, lambda x, ctx: x.detach().requires_grad_() if x.is_floating_point() else None)]
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), model.hooks(record + scaled(u)):
            moved = model(ids)
            probe = torch.zeros_like(moved, requires_grad=True)
            (du,) = torch.autograd.grad(moved, u, probe, create_graph=True)
            (tangent,) = torch.autograd.grad(du, probe)  # d logits / du: the ablation's direction, to first order
        first_order = (dlogits.double() * tangent.double()).flatten(2).sum(-1)
        exact = torch.zeros_like(first_order)
        with torch.no_grad():
            swapped = clean.clone()
            for b, t in np.ndindex(*clean.shape[:2]):
                swapped[b, t] = ablated[b, t]
                exact[b, t] = float(metric(swapped)) - base
                swapped[b, t] = clean[b, t]
        out[..., s] = exact - first_order
    return out


def ablation_sweep(model: CausalLM, ids: torch.Tensor, metric: Metric, *, layers: Iterable[int] | None = None,
                   progress: bool = True) -> xr.DataArray:
    """Exact metric(ablated) - metric(clean) for each (layer, expert) under `ablate(layer, [expert])` (mode "zero"),
    one forward per expert the input routes to (an expert no token selects changes nothing: exactly 0).
    Returns [layer, expert], as `expert_attribution`; `layers` sweeps only those MoE layers (fewer forwards)."""
    layers = _only(moe_layers(model), layers)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, [f"layers.{i}.router.topk_ids" for i in layers])
        clean = float(metric(logits))
        exact = np.zeros((len(layers), max(layers.values())))
        pairs = [(j, i, e) for j, i in enumerate(layers)
                 for e in cache[f"layers.{i}.router.topk_ids"].unique().tolist()]
        for j, i, e in tqdm(pairs, desc="ablation sweep", unit="ablation", disable=not progress):
            with model.hooks(ablate(i, [e])):
                exact[j, e] = float(metric(model(ids))) - clean
    return _labelled(exact, layers, "ablation_sweep", metric=clean, ablation=ABLATION, estimate="exact")


def attribution_patching(model: CausalLM, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, metric: Metric,
                         names: Iterable[str] = ()) -> xr.Dataset:
    """First-order estimates of metric(patched) - metric(clean) when parts of the clean run take their values from
    the corrupt run (same shape of ids), from one corrupt forward and one clean forward and backward.

    `experts` [token, layer, expert]: expert e's weighted output at layer i (zero where it is not selected) replaced
    by its value on the corrupt prompt, as grad(moe.out) . (w' out' - w out). `points` [hook, token]: each floating
    hook point of `names` (names or globs) patched at one position, as `patch` does, grad . (corrupt - clean).
    """
    clean_ids, corrupt_ids = torch.as_tensor(clean_ids), torch.as_tensor(corrupt_ids)
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"attribution_patching: clean ids {tuple(clean_ids.shape)} and corrupt ids "
                         f"{tuple(corrupt_ids.shape)} must have one shape (positions patch position by position)")
    layers = moe_layers(model)
    wanted = [n for p in names for n in match(p, model.hook_names)]
    per_expert = [f"layers.{i}.{p}" for i in layers
                  for p in ("router.topk_ids", "router.topk_weights", "experts.out", "moe.out")]
    with torch.no_grad():
        _, corrupt = model.run_with_cache(corrupt_ids, per_expert + wanted)
    logits, clean, grads = model.run_with_cache(clean_ids, per_expert + wanted, grad=True, metric=metric)
    B, T = logits.shape[:2]
    experts = torch.zeros(T, len(layers), max(layers.values()), dtype=torch.float64)
    for j, i in enumerate(layers):
        g = grads[f"layers.{i}.moe.out"].double()
        for run, sign in ((corrupt, 1.0), (clean, -1.0)):
            out, w = run[f"layers.{i}.experts.out"].double(), run[f"layers.{i}.router.topk_weights"].double()
            part = sign * w * (out * g.unsqueeze(-2)).flatten(3).sum(-1)  # [B, T, k]
            chosen = run[f"layers.{i}.router.topk_ids"]
            experts[:, j] += part.new_zeros(B, T, experts.shape[-1]).scatter_add_(-1, chosen, part).sum(0).cpu()
    points = [n for n in dict.fromkeys(wanted) if n in grads]
    per_point = np.array([((corrupt[n] - clean[n]).double() * grads[n].double()).flatten(2).sum((0, 2)).cpu().numpy()
                          for n in points]).reshape(len(points), T)
    with torch.no_grad():
        value = float(metric(logits))
    return xr.Dataset(
        {"experts": _labelled(experts.numpy(), layers, "experts"),
         "points": xr.DataArray(per_point, dims=("hook", "token"), coords={"hook": points, "token": np.arange(T)})},
        attrs={"metric": value, "estimate": "first order (gradient x difference)"})


def _only(layers: dict[int, int], wanted: Iterable[int] | None) -> dict[int, int]:
    """The MoE layers `layers` restricted to `wanted` (None: all), refusing a layer that is not one of them."""
    if wanted is None:
        return layers
    wanted = [int(i) for i in wanted]
    missing = [i for i in wanted if i not in layers]
    if missing or not wanted:
        raise ValueError(f"layers {wanted} must be some of the MoE layers {list(layers)}")
    return {i: n for i, n in layers.items() if i in wanted}


def _labelled(values: np.ndarray, layers: dict[int, int], name: str, **attrs) -> xr.DataArray:
    """values [token, layer, expert] or [layer, expert] as a DataArray with the model's labels."""
    dims = ("token", "layer", "expert")[-values.ndim:]
    coords = {"layer": list(layers), "expert": np.arange(values.shape[-1])}
    if values.ndim == 3:
        coords["token"] = np.arange(values.shape[0])
    return xr.DataArray(values, dims=dims, coords=coords, name=name, attrs=attrs)
