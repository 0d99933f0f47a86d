"""Routing Datasets: `from_cache` builds one in memory as `open_store` reads one from a store (both follow
`workbench.schema`), `routed_view` and `expert_count` give what every analysis reads from either, `hash_routed`
tells the hash-routed layers, and `label_codes` encodes per-token labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from .. import provenance
from ..schema import (DTYPES, INPUT_IDS, ROUTER_LOGITS, ROUTER_SCORES, ROUTER_TOPK_IDS, TOPK_IDS, hook_kind, layer_of,
                      layers_of, variables)
from .scan import token_reader

HASH_PROBE_TOKENS = 8192  # tokens inspected to tell hash-routed layers
HASH_MIN_REPEATS = 16  # repeated token ids needed before a layer can be called hash-routed
ArrayLike = Any  # numpy array, DataArray, torch tensor or sequence


def from_cache(cache: Mapping[str, Any], input_ids: ArrayLike, *, n_experts: int | None = None,
               logits: ArrayLike | None = None) -> xr.Dataset:
    """The Dataset `open_store` would give for one sequence, built from `model.run_with_cache` outputs, so that
    in-memory traces and stores go through the same analyses.

    `cache` must hold `layers.*.router.topk_ids` ([1, T, k]); any other hook becomes a variable named as in the
    store (`layers.3.experts.out` -> `experts_out(layer, token, k, hidden)`). `n_experts` defaults to the last
    dim of a cached `router.scores`/`router.logits`. `logits` (the forward's output) adds `predicted_ids(token)`.
    """
    ids = as_numpy(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be one sequence, shape [T] or [1, T]; got {list(ids.shape)} "
                         "(build one Dataset per sequence and xr.concat them along token)")
    n = len(ids)
    arrays = {name: as_numpy(t) for name, t in cache.items()}
    for name, a in arrays.items():
        if a.ndim < 2 or a.shape[0] != 1 or a.shape[1] != n:
            raise ValueError(f"{name} has shape {list(a.shape)}; expected [1, {n}, ...] (one sequence of {n} tokens)")
    routed = sorted(layer_of(h) for h in arrays if hook_kind(h) == ROUTER_TOPK_IDS and layer_of(h) is not None)
    if not routed:
        raise ValueError("cache holds no layers.*.router.topk_ids; run_with_cache(ids, names=['layers.*.router.*'])")
    if n_experts is None:
        sized = [a.shape[-1] for h, a in arrays.items() if hook_kind(h) in (ROUTER_SCORES, ROUTER_LOGITS)]
        if not sized:
            raise ValueError("pass n_experts= (or cache layers.*.router.scores) to say how many experts route")
        n_experts = sized[0]
    data: dict[str, tuple] = {INPUT_IDS: (("token",), ids.astype(DTYPES[INPUT_IDS]))}
    for v in variables({h: (a.shape[2:], a.dtype) for h, a in arrays.items()}, n):
        if not v.layered:
            (hook,) = v.hooks
            data[v.name] = (v.dims, arrays[hook][0].astype(v.dtype))
            continue
        block = np.full(v.shape, v.fill, v.dtype)
        for hook, i in v.hooks.items():
            block[i] = arrays[hook][0]
        data[v.name] = (v.dims, block)
    if logits is not None:
        lg = as_numpy(logits)
        data["predicted_ids"] = (("token",), lg.reshape(-1, lg.shape[-1]).argmax(-1).astype(np.int32))
    k = data[TOPK_IDS][1].shape[-1]
    ds = xr.Dataset(data, coords={"layer": np.asarray(layers_of(arrays), np.int64), "token": np.arange(n)},
                    attrs={"n_experts": int(n_experts), "k": int(k), "routed_layers": routed})
    provenance.record_dataset(ds)  # only under `workbench publish` / `verify`: the routing hash
    return ds


def as_numpy(x: ArrayLike) -> np.ndarray:
    """A torch tensor (bfloat16 as float32), DataArray or array-like as numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x.values if isinstance(x, xr.DataArray) else x)


def dims_first(da: xr.DataArray, *dims: str) -> xr.DataArray:
    """`da` with `dims` leading (a plain store variable already is: left untouched, so it keeps its fast reader)."""
    return da if da.dims[:len(dims)] == dims else da.transpose(*dims, ...)


def routed_view(ds: xr.Dataset) -> xr.Dataset:
    """`ds` restricted to its routed layers (a store's dense layers hold -1), topk_ids as (layer, token, k)."""
    if "topk_ids" not in ds:
        raise ValueError("the Dataset has no topk_ids; open a store with wb.open_store or build one with from_cache")
    if ds.topk_ids.dims != ("layer", "token", "k"):
        ds = ds.assign(topk_ids=dims_first(ds.topk_ids, "layer", "token", "k"))
    routed = ds.attrs.get("routed_layers")
    if routed is not None:
        keep = [int(x) for x in ds.layer.values if int(x) in set(routed)]
        if len(keep) < ds.sizes["layer"]:
            ds = ds.sel(layer=keep)
    if ds.sizes["layer"] == 0:
        raise ValueError("the Dataset holds no routed layer")
    return ds


def expert_count(ds: xr.Dataset) -> int:
    """How many experts route in `ds` (its `n_experts` attr), with a clear error where it is missing."""
    e = ds.attrs.get("n_experts")
    if not e:
        raise ValueError("the Dataset's attrs do not say n_experts; build it with from_cache(..., n_experts=E)")
    return int(e)


def label_codes(labels: ArrayLike, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes int32 per token, label names) of per-token categorical labels (strings or integers)."""
    values = as_numpy(labels)
    if values.shape != (n,):
        raise ValueError(f"labels must give one label per token ({n}); got shape {list(values.shape)}")
    names, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int32), names


def hash_routed(ds: xr.Dataset) -> xr.DataArray:
    """Per layer, whether its routing is a fixed function of the token id (DeepSeek-V4's hash layers): on the
    first HASH_PROBE_TOKENS tokens every repeated id got exactly the same ranked experts (and ids repeat)."""
    ds = routed_view(ds)
    m = min(ds.sizes["token"], HASH_PROBE_TOKENS)
    source = ds.encoding.get("source")
    ids = token_reader(ds.topk_ids, source)(0, m)
    tokens = token_reader(ds.input_ids, source)(0, m) if "input_ids" in ds else None
    if tokens is None:
        flags = [False] * len(ids)
    else:
        order = np.argsort(tokens, kind="stable")
        repeat = tokens[order][1:] == tokens[order][:-1]
        ranked = ids[:, order]
        flags = [bool(repeat.sum() >= HASH_MIN_REPEATS and (r[1:][repeat] == r[:-1][repeat]).all()) for r in ranked]
    return xr.DataArray(np.asarray(flags), coords={"layer": ds.layer.values}, dims="layer", name="hash_routed",
                        attrs={"definition": "routing is a function of the input token id on the probed tokens"})
