"""Attribution of a metric on the logits to experts and hook points: first-order estimates from one forward and one
backward (`CausalLM.run_with_cache(grad=True)`), and the exact ablation sweep they estimate (README, "Gradients and
attribution").

Every result is a labelled xarray object: layers are the checkpoint's numbers, experts the router's ids, tokens
the positions of the input (summed over its batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import xarray as xr
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


def expert_attribution(model: CausalLM, ids: torch.Tensor, metric: Metric, *, per_token: bool = False) -> xr.DataArray:
    """First-order estimate of metric(ablated) - metric(clean) for each (layer, expert) ablated as `ablate` does by
    default (weight 0 wherever selected, the other weights unchanged), from one forward and one backward.

    At each token and slot choosing the expert the estimate is -w * dmetric/dw for its top-k weight w, which is
    -(gradient at the slot's weighted output) . (its weighted output); summed over the tokens routed to it.
    Returns [layer, expert], or [token, layer, expert] with `per_token`.
    """
    layers = moe_layers(model)
    names = [f"layers.{i}.router.{p}" for i in layers for p in ("topk_ids", "topk_weights")]
    logits, cache, grads = model.run_with_cache(ids, names, grad=True, metric=metric)
    B, T = logits.shape[:2]
    est = torch.zeros(T, len(layers), max(layers.values()), dtype=torch.float64)
    for j, i in enumerate(layers):
        w, chosen = f"layers.{i}.router.topk_weights", cache[f"layers.{i}.router.topk_ids"]
        effect = -(cache[w].double() * grads[w].double())  # [B, T, k]
        est[:, j] = est.new_zeros(B, T, est.shape[-1]).scatter_add_(-1, chosen.cpu(), effect.cpu()).sum(0)
    with torch.no_grad():
        value = float(metric(logits))
    out = _labelled(est.numpy(), layers, "expert_attribution", metric=value, ablation=ABLATION,
                    estimate="first order (gradient x weight)")
    return out if per_token else out.sum("token", keep_attrs=True)


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
