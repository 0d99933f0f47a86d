"""Routing as a function of position over a long store: expert load, load entropy and domain specialisation per
bin of positions, and for DeepSeek-V4's CSA layers how far back the indexer's picks reach."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from ..errors import InputError
from .dataset import ArrayLike, dims_first, expert_count, label_codes, routed_view
from .metrics import _joint, _labelled, _mi_bits
from .scan import scan_blocks

PICKS = "attn_indexer_topk"  # the store / from_cache variable of the CSA `attn.indexer_topk` hook


def position_edges(positions: np.ndarray, bins: int | ArrayLike) -> np.ndarray:
    """Bin edges over token positions: `bins` equal-width bins from the first position to one past the last (as
    the long-context navigator bins them; fewer where there are fewer positions), or the given increasing edges."""
    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise InputError(f"bins must be at least 1; got {bins}")
        lo, hi = (int(positions[0]), int(positions[-1]) + 1) if len(positions) else (0, 1)
        if hi - lo < bins:
            return np.arange(lo, hi + 1)
        return lo - (-np.arange(bins + 1) * (hi - lo) // bins)  # position p in bin (p - lo) * bins // (hi - lo)
    edges = np.asarray(bins, np.int64)
    if edges.ndim != 1 or len(edges) < 2 or (np.diff(edges) <= 0).any():
        raise InputError(f"bins must be a count or at least two increasing edges; got {bins!r}")
    return edges


def by_position(ds: xr.Dataset, bins: int | ArrayLike = 64, labels: ArrayLike | None = None) -> xr.Dataset:
    """Per (layer, position bin): each expert's `share` of the routing slots, the normalised `entropy` of that
    load (1 = every expert equally loaded in the bin), MaxVio, and with per-token `labels` (domains) OLMoE's
    `specialisation` N(e, domain) / N(domain) within the bin and the domain-expert mutual information `mi`
    (bits). `bins`: a count of equal-width bins over the positions, or the edges. Tokens outside the edges
    are left out. Scans the store in blocks (lazily; on a dask cluster where one is current)."""
    ds = routed_view(ds)
    E, k, n = expert_count(ds), ds.sizes["k"], ds.sizes["token"]
    positions = ds.token.values
    edges = position_edges(positions, bins)
    nb = len(edges) - 1
    where = np.searchsorted(edges, positions, side="right") - 1
    code = np.where((where >= 0) & (where < nb), where, -1).astype(np.int32)
    names = None
    if labels is not None:
        domain, names = label_codes(labels, n)
        code = np.where(code >= 0, domain * nb + code, -1).astype(np.int32)
    groups = nb * (1 if names is None else len(names))
    joint = _joint(ds, code, groups, k)  # [L, groups, E]
    if names is not None:
        by_domain = joint.reshape(len(joint), len(names), nb, E)
        counts = by_domain.sum(1)
    else:
        counts = joint
    slots = counts.sum(-1, keepdims=True)
    share = counts / np.maximum(slots, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(share > 0, share * np.log(share), 0.0).sum(-1) / math.log(E)
        maxvio = (counts.max(-1) - slots[..., 0] / E) / (slots[..., 0] / E)
    empty = slots[..., 0] == 0
    entropy[empty] = np.nan
    maxvio[empty] = np.nan
    data: dict[str, Any] = {
        "share": (("layer", "bin", "expert"), share, {"definition": "slots of the bin routed to e / slots of the bin",
                                                      "baseline": 1 / E}),
        "entropy": (("layer", "bin"), entropy, {"definition": "entropy of the bin's load share / ln E",
                                                "baseline": 1.0}),
        "maxvio": (("layer", "bin"), maxvio, {"definition": "(max load - mean load) / mean load in the bin",
                                              "baseline": 0.0}),
        "tokens": (("layer", "bin"), slots[..., 0] // k, {"definition": "tokens routed in the bin"})}
    coords: dict[str, Any] = {"layer": ds.layer.values, "bin": np.arange(nb), "bin_start": ("bin", edges[:-1]),
                              "bin_stop": ("bin", edges[1:]), "expert": np.arange(E)}
    if names is not None:
        tokens = np.bincount(np.where(code >= 0, code, groups), minlength=groups + 1)[:groups].reshape(len(names), nb)
        data["specialisation"] = (("domain", "layer", "bin", "expert"),
                                  by_domain.transpose(1, 0, 2, 3) / np.maximum(tokens, 1)[:, None, :, None],
                                  {"definition": "N(e, domain) / N(domain) within the bin", "baseline": k / E})
        data["domain_tokens"] = (("domain", "bin"), tokens, {"definition": "N(domain) in the bin"})
        table = by_domain.transpose(0, 2, 1, 3).reshape(-1, len(names), E)  # [(layer, bin), domain, expert]
        data["mi"] = (("layer", "bin"), _mi_bits(table).reshape(len(joint), nb),
                      {"definition": "I(domain; expert) in bits over the bin's routing slots"})
        coords["domain"] = names
    return _labelled(xr.Dataset(data, coords=coords), ds, metric="routing by position", bins=nb)


def pick_distances(ds: xr.Dataset, rate: int | None = None, *, window: int | None = None, per_octave: int = 1,
                   layers: ArrayLike | None = None) -> xr.Dataset:
    """For DeepSeek-V4's CSA layers, how far back the indexer's picks reach: per layer, the picked entries
    (`attn_indexer_topk`, recorded with names=["layers.*.attn.indexer_topk"]) counted by their distance from
    the query, t - w * rate for entry w (its rotary position; it pools tokens up to (w + 1) * rate - 1), in
    log2-spaced bins (`per_octave` per doubling) from 1 up, with the mean and largest distance, and with
    `window` (the sliding window) the share of picks at least that far back. `rate` defaults to the Dataset's
    `compress_rates` attr. Empty slots (-1) are not counted; by default the layers with any pick are kept."""
    if PICKS not in ds:
        raise InputError("the Dataset has no attn_indexer_topk: record it with "
                         "names=['layers.*.attn.indexer_topk'] (CSA layers of a DeepSeek-V4 model)")
    rate = _csa_rate(ds) if rate is None else int(rate)
    if rate < 1:
        raise InputError(f"rate must be a positive compression rate; got {rate}")
    chosen = [int(x) for x in (ds.layer.values if layers is None else np.asarray(layers).reshape(-1))]
    picks = dims_first(ds[PICKS].sel(layer=chosen), "layer", "token")
    positions = ds.token.values.astype(np.int64)
    top = max(int(positions[-1]) + 1 if len(positions) else 2, 2)
    octaves = np.arange(0, math.ceil(math.log2(top)) * per_octave + 1) / per_octave
    edges = np.concatenate([[0], np.unique(np.round(2.0 ** octaves)).astype(np.int64)])
    nb, L = len(edges) - 1, len(chosen)
    hist = np.zeros((L, nb), np.int64)
    total, biggest, beyond = np.zeros(L), np.full(L, -1, np.int64), np.zeros(L, np.int64)
    for s, e, (block,) in scan_blocks(ds, [picks]):
        block = block.reshape(L, e - s, -1).astype(np.int64)
        dist = positions[s:e][None, :, None] - block * rate
        for i in range(L):
            d = dist[i][block[i] >= 0]
            hist[i] += np.bincount(np.clip(np.searchsorted(edges, d, side="right") - 1, 0, nb - 1), minlength=nb)
            total[i] += d.sum()
            biggest[i] = max(biggest[i], int(d.max())) if d.size else biggest[i]
            beyond[i] += np.count_nonzero(d >= window) if window else 0
    picked = hist.sum(-1)
    keep = picked > 0 if layers is None else np.ones(L, bool)
    data: dict[str, Any] = {
        "hist": (("layer", "bin"), hist, {"definition": "picks with distance in [bin_start, bin_stop)"}),
        "share": (("layer", "bin"), hist / np.maximum(picked, 1)[:, None], {"definition": "hist / picks"}),
        "picks": ("layer", picked, {"definition": "picked entries counted (empty slots left out)"}),
        "mean_distance": ("layer", np.where(picked > 0, total / np.maximum(picked, 1), np.nan),
                          {"definition": "mean of t - w * rate over the picks"}),
        "max_distance": ("layer", biggest, {"definition": "largest distance picked (-1: none)"})}
    if window:
        data["beyond_window"] = ("layer", beyond / np.maximum(picked, 1),
                                 {"definition": f"share of picks at distance >= the sliding window ({window})"})
    out = xr.Dataset(data, coords={"layer": np.asarray(chosen, np.int64), "bin": np.arange(nb),
                                   "bin_start": ("bin", edges[:-1]), "bin_stop": ("bin", edges[1:])},
                     attrs={"metric": "indexer pick distance", "rate": rate, "tokens": int(ds.sizes["token"]),
                            "definition": "query position minus the picked entry's rotary position w * rate"})
    return out.isel(layer=np.flatnonzero(keep))


def _csa_rate(ds: xr.Dataset) -> int:
    """The CSA compression rate from a Dataset's attrs (`compress_rates` of the model config), else an error."""
    rates = ds.attrs.get("compress_rates")
    if isinstance(rates, dict) and "compressed_sparse_attention" in rates:
        return int(rates["compressed_sparse_attention"])
    raise InputError("pass rate= (the CSA layers' compression rate, config compress_rates): the Dataset's attrs "
                     "do not say it")
