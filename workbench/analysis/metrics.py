"""The routing metrics from the MoE literature. Each scans a routing Dataset (`dataset`) in token blocks
(`scan`), counts with numba kernels (`kernels`), here or on a dask cluster (`cluster`), and returns labelled
xarray objects whose attrs state the metric's definition and, where one exists, its value under uniform random
routing. Definitions follow the papers (docs/references.md):

- load (DeepSeek, EPLB): per-expert counts and share, normalised entropy, CV, Gini, dead experts, MaxVio,
  relative load = actual / uniform; `eplb_weight` exports the [layers, experts] matrix EPLB rebalances.
- co-activation (OLMoE): N(i, j) / N(i) over all pairs of a token's top-k, or only adjacent ranks as OLMoE's
  released code counts them.
- domain and vocabulary specialisation (OLMoE): N(e, group) / N(group).
- consecutive-token repetition (Mixtral): same first choice; intersecting top-2 sets.
- router saturation (OLMoE) and top-k Jaccard between two traces of the same tokens.
- cross-layer joint routing counts, token/domain-expert mutual information, router confidence, super experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .cluster import accumulate, later_max
from .dataset import ArrayLike, as_numpy, dims_first, expert_count, hash_routed, label_codes, routed_view
from .kernels import (FIXED_POINT, coactivation_step, confidence_step, count_overlap, cross_step, joint_step,
                      load_step, max_abs_step, repetition_step)
from .scan import scan_blocks, token_reader


def _labelled(out: xr.Dataset, ds: xr.Dataset, **attrs: Any) -> xr.Dataset:
    """`out` with what every result carries: the hash_routed flag per layer, n_experts, k, tokens scanned, and
    `attrs`."""
    if "layer" in out.dims:
        out = out.assign_coords(hash_routed=hash_routed(ds))
    out.attrs.update({"n_experts": expert_count(ds), "k": int(ds.sizes["k"]), "tokens": int(ds.sizes["token"]),
                      **attrs})
    return out


# ---------------------------------------------------------------- load


def expert_load(ds: xr.Dataset) -> xr.Dataset:
    """Per layer and expert: routing counts and share; per layer: normalised entropy, coefficient of variation,
    Gini, dead experts, MaxVio and DeepSeek's relative load (actual / uniform)."""
    ds = routed_view(ds)
    E, L = expert_count(ds), ds.sizes["layer"]
    counts, tokens = accumulate(ds, [ds.topk_ids], load_step, [((L, E), np.int64), ((L,), np.int64)])
    return _load_dataset(counts, tokens, ds)


def _load_dataset(counts: np.ndarray, tokens: np.ndarray, ds: xr.Dataset) -> xr.Dataset:
    E, k = counts.shape[-1], ds.sizes["k"]
    total = counts.sum(-1, keepdims=True)
    share = counts / np.maximum(total, 1)
    mean = total / E
    safe = np.where(share > 0, share, 1.0)
    entropy = -(share * np.log(safe)).sum(-1) / math.log(E)
    cv = counts.std(-1) / np.maximum(mean[..., 0], 1e-300)
    ranked = np.sort(counts, -1)
    weights = 2 * np.arange(1, E + 1) - E - 1
    gini = (ranked * weights).sum(-1) / (E * np.maximum(total[..., 0], 1))
    maxvio = (counts.max(-1) - mean[..., 0]) / np.maximum(mean[..., 0], 1e-300)
    uniform = tokens[:, None] * k / E
    dims2 = ("layer", "expert")
    out = xr.Dataset(
        {"counts": (dims2, counts, {"definition": "routing slots (token, rank) that selected the expert"}),
         "share": (dims2, share, {"definition": "counts / all slots of the layer", "baseline": 1 / E}),
         "relative_load": (dims2, counts / np.maximum(uniform, 1e-300),
                           {"definition": "DeepSeek's relative load: counts / (tokens k / E)", "baseline": 1.0}),
         "dead": (dims2, counts == 0, {"definition": "the expert was never selected"}),
         "n_dead": ("layer", (counts == 0).sum(-1), {"definition": "experts never selected"}),
         "entropy": ("layer", entropy, {"definition": "entropy of share / ln E (1 = perfectly balanced)",
                                        "baseline": 1.0}),
         "cv": ("layer", cv, {"definition": "std / mean of the counts over experts (population std)",
                              "baseline": "uniform routing: sqrt((E - k) / (tokens k))"}),
         "gini": ("layer", gini, {"definition": "Gini coefficient of the counts (0 = balanced)", "baseline": 0.0}),
         "maxvio": ("layer", maxvio, {"definition": "MaxVio = (max load - mean load) / mean load", "baseline": 0.0}),
         "tokens": ("layer", tokens, {"definition": "tokens with routing in the layer"})},
        coords={"layer": ds.layer.values, "expert": np.arange(E)})
    return _labelled(out, ds, metric="expert load")


def eplb_weight(ds: xr.Dataset) -> Any:
    """The [layers, logical experts] load matrix DeepSeek's EPLB `rebalance_experts(weight, ...)` takes, as a
    torch int64 tensor, from a routing Dataset or an `expert_load` result (rows in the `layer` order)."""
    import torch

    load = ds if "counts" in ds and "topk_ids" not in ds else expert_load(ds)
    return torch.from_numpy(np.ascontiguousarray(load.counts.transpose("layer", "expert").values))


# ---------------------------------------------------------------- co-activation


def coactivation(ds: xr.Dataset, mode: str = "all_pairs") -> xr.Dataset:
    """Expert co-activation N(i, j) / N(i) per layer: of the tokens that selected expert i, the share that also
    selected j. mode="all_pairs": any two of the top-k; "adjacent_ranks": only neighbouring ranks of the ranked
    top-k (k - 1 pairs per token), as OLMoE's released analysis counts them."""
    if mode not in ("all_pairs", "adjacent_ranks"):
        raise ValueError(f"mode must be 'all_pairs' or 'adjacent_ranks', got {mode!r}")
    ds = routed_view(ds)
    E, L, k = expert_count(ds), ds.sizes["layer"], ds.sizes["k"]
    pairs, counts, _ = accumulate(ds, [ds.topk_ids], coactivation_step,
                                   [((L, E, E), np.int64), ((L, E), np.int64), ((L,), np.int64)],
                                   params=(mode == "adjacent_ranks",))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = pairs / counts[:, :, None]
    baseline = (k - 1) / (E - 1) if mode == "all_pairs" else 2 * (k - 1) / (k * (E - 1))
    dims = ("layer", "expert_i", "expert_j")
    out = xr.Dataset(
        {"coactivation": (dims, ratio, {"definition": "N(i, j) / N(i); NaN where expert i was never selected",
                                        "baseline": baseline}),
         "pairs": (dims, pairs, {"definition": "N(i, j): tokens with both i and j (symmetric, diagonal 0)"}),
         "counts": (("layer", "expert_i"), counts, {"definition": "N(i): tokens that selected expert i"})},
        coords={"layer": ds.layer.values, "expert_i": np.arange(E), "expert_j": np.arange(E)})
    return _labelled(out, ds, metric="co-activation", mode=mode,
                   baseline=f"uniform routing: {'(k-1)/(E-1)' if mode == 'all_pairs' else '2(k-1)/(k(E-1))'}")


# ---------------------------------------------------------------- specialisation and mutual information


def _joint(ds: xr.Dataset, codes: np.ndarray, groups: int, top: int) -> np.ndarray:
    """counts[layer, group, expert] of routing slots of rank < top, tokens grouped by `codes` (-1: skipped)."""
    E, L = expert_count(ds), ds.sizes["layer"]
    return accumulate(ds, [ds.topk_ids], joint_step, [((L, groups, E), np.int64)], [codes], (top,))[0]


def domain_specialisation(ds: xr.Dataset, labels: ArrayLike) -> xr.Dataset:
    """OLMoE's domain specialisation: of a domain's tokens, the share that has expert e among its top-k,
    N(e, domain) / N(domain) (uniform k/E); `relative` is that over k/E, DeepSeek's relative load per
    (domain, layer, expert). `labels`: one domain label per token."""
    ds = routed_view(ds)
    E, k = expert_count(ds), ds.sizes["k"]
    codes, names = label_codes(labels, ds.sizes["token"])
    counts = _joint(ds, codes, len(names), k).transpose(1, 0, 2)
    tokens = np.bincount(codes, minlength=len(names))
    share = counts / np.maximum(tokens, 1)[:, None, None]
    dims = ("domain", "layer", "expert")
    out = xr.Dataset(
        {"specialisation": (dims, share, {"definition": "N(e, domain) / N(domain)", "baseline": k / E}),
         "relative": (dims, share * E / k, {"definition": "specialisation / (k / E): actual / uniform",
                                            "baseline": 1.0}),
         "counts": (dims, counts, {"definition": "N(e, domain): the domain's tokens with e in their top-k"}),
         "tokens": ("domain", tokens, {"definition": "N(domain)"})},
        coords={"domain": names, "layer": ds.layer.values, "expert": np.arange(E)})
    return _labelled(out, ds, metric="domain specialisation", baseline="uniform routing: k/E")


def _token_ids(ds: xr.Dataset, against: str | ArrayLike) -> np.ndarray:
    """One token id per position (-1: none): the input, the next input, the predicted id, or given ids."""
    n = ds.sizes["token"]
    if not isinstance(against, str):
        ids = as_numpy(against).astype(np.int64)
        if ids.shape != (n,):
            raise ValueError(f"against must give one token id per position ({n}); got shape {list(ids.shape)}")
        return ids
    if against in ("input", "next"):
        ids = np.concatenate([b for _, _, (b,) in scan_blocks(ds, [ds.input_ids])]).astype(np.int64)
        return ids if against == "input" else np.append(ids[1:], -1)
    if against == "predicted":
        if "predicted_ids" in ds:
            return np.concatenate([b for _, _, (b,) in scan_blocks(ds, [ds.predicted_ids])]).astype(np.int64)
        if "logits" in ds:
            logits = dims_first(ds.logits, "token")
            return np.concatenate([b.argmax(-1) for _, _, (b,) in scan_blocks(ds, [logits])]).astype(np.int64)
        raise ValueError("against='predicted' needs predicted_ids (from_cache(..., logits=...)) or a stored logits "
                         "variable (trace with names=['logits'])")
    raise ValueError(f"against must be 'input', 'next', 'predicted' or per-token ids, got {against!r}")


def vocabulary_specialisation(ds: xr.Dataset, against: str | ArrayLike = "input", *, min_count: int = 10,
                              top1: bool = False) -> xr.Dataset:
    """OLMoE's vocabulary specialisation: for each token id x seen at least `min_count` times, the share of its
    occurrences routed to expert e, N(e, x) / N(x), with x the input token, the next token or the predicted
    token (`against`). top1=True counts only the first choice (as OLMoE's released script does)."""
    ds = routed_view(ds)
    E, k = expert_count(ds), ds.sizes["k"]
    ids = _token_ids(ds, against)
    occurrences = np.bincount(ids[ids >= 0])
    kept = np.flatnonzero(occurrences >= min_count)
    lut = np.full(max(len(occurrences), 1), -1, np.int32)
    lut[kept] = np.arange(len(kept))
    codes = np.where(ids >= 0, lut[np.clip(ids, 0, None)], -1).astype(np.int32)
    counts = _joint(ds, codes, len(kept), 1 if top1 else k)
    n = occurrences[kept]
    share = counts / np.maximum(n, 1)[None, :, None]
    baseline = 1 / E if top1 else k / E
    dims = ("layer", "token_id", "expert")
    out = xr.Dataset(
        {"specialisation": (dims, share, {"definition": "N(e, x) / N(x)", "baseline": baseline}),
         "counts": (dims, counts, {"definition": "N(e, x): occurrences of x routed to e"}),
         "occurrences": ("token_id", n, {"definition": "N(x)"}),
         "top_expert": (("layer", "token_id"), share.argmax(-1), {"definition": "the expert x goes to most"}),
         "top_share": (("layer", "token_id"), share.max(-1), {"definition": "max over e of N(e, x) / N(x)"}),
         "mean_top_share": ("layer", share.max(-1).mean(-1) if len(kept) else np.full(len(share), np.nan),
                            {"definition": "top_share averaged over the kept token ids"})},
        coords={"layer": ds.layer.values, "token_id": kept, "expert": np.arange(E)})
    name = against if isinstance(against, str) else "given"
    return _labelled(out, ds, metric="vocabulary specialisation", against=name, min_count=min_count,
                   top1=int(top1), baseline=f"uniform routing: {'1/E' if top1 else 'k/E'}")


def _mi_bits(joint: np.ndarray) -> np.ndarray:
    """Mutual information (bits) of each layer's [label, expert] count table."""
    p = joint / np.maximum(joint.sum((1, 2), keepdims=True), 1)
    px, pe = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (px * pe)), 0.0)
    return terms.sum((1, 2))


def _entropy_bits(p: np.ndarray, axis: int) -> np.ndarray:
    p = p / np.maximum(p.sum(axis, keepdims=True), 1e-300)
    return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis)


def mutual_information(ds: xr.Dataset, labels: str | ArrayLike = "token", *, top1: bool = False,
                       seed: int = 0) -> xr.Dataset:
    """Mutual information in bits between a token's label and the experts it is routed to, per layer: labels
    "token" (the input token id) or one label per token (e.g. its domain). Each routing slot is one (label,
    expert) sample (top1: first choice only). `mi_shuffled` is the same with the labels randomly permuted over
    the tokens (seed): the finite-sample value of independent labels, to subtract."""
    ds = routed_view(ds)
    k = ds.sizes["k"]
    if isinstance(labels, str) and labels == "token":
        ids = _token_ids(ds, "input")
        names, codes = np.unique(ids, return_inverse=True)
        codes = codes.astype(np.int32)
    else:
        codes, names = label_codes(labels, ds.sizes["token"])
    top = 1 if top1 else k
    joint = _joint(ds, codes, len(names), top)
    shuffled = _joint(ds, codes[np.random.default_rng(seed).permutation(len(codes))], len(names), top)
    out = xr.Dataset(
        {"mi": ("layer", _mi_bits(joint), {"definition": "I(label; expert) in bits over routing slots"}),
         "mi_shuffled": ("layer", _mi_bits(shuffled), {"definition": "the same with labels permuted over tokens",
                                                       "baseline": "independent labels"}),
         "h_expert": ("layer", _entropy_bits(joint.sum(1), -1), {"definition": "H(expert) in bits"}),
         "h_label": ("layer", _entropy_bits(joint.sum(2), -1), {"definition": "H(label) in bits"})},
        coords={"layer": ds.layer.values})
    return _labelled(out, ds, metric="mutual information", labels=labels if isinstance(labels, str) else "given",
                   top1=int(top1), seed=seed)


# ---------------------------------------------------------------- consecutive tokens, checkpoints, layers


def repetition(ds: xr.Dataset, labels: ArrayLike | None = None) -> xr.Dataset:
    """Mixtral's consecutive-token repetition per layer: the share of consecutive token pairs with the same
    first choice (random 1/E), with intersecting top-2 sets ("first or second choice", random
    1 - C(E-2, 2) / C(E, 2)), and their mean top-k overlap |E_t ∩ E_t-1| / k (random k/E). With per-token
    `labels` (e.g. domain) pairs are counted per label and pairs across a label change are left out."""
    ds = routed_view(ds)
    E, L, k, n = expert_count(ds), ds.sizes["layer"], ds.sizes["k"], ds.sizes["token"]
    if labels is None:
        codes, names = np.zeros(n, np.int32), None
    else:
        codes, names = label_codes(labels, n)
    groups = 1 if names is None else len(names)
    (out,) = accumulate(ds, [ds.topk_ids], repetition_step, [((groups, L, 4), np.int64)], [codes], lookback=1)
    pairs = np.maximum(out[..., 0], 1)
    second = out[..., 2] / pairs if k > 1 else np.full(out.shape[:2], np.nan)
    dims = ("domain", "layer")
    res = xr.Dataset(
        {"first": (dims, out[..., 1] / pairs, {"definition": "same top-1 expert as the previous token",
                                               "baseline": 1 / E}),
         "first_or_second": (dims, second, {"definition": "top-2 sets of consecutive tokens intersect",
                                            "baseline": 1 - math.comb(E - 2, 2) / math.comb(E, 2)}),
         "overlap": (dims, out[..., 3] / pairs / k, {"definition": "mean |E_t ∩ E_t-1| / k", "baseline": k / E}),
         "pairs": (dims, out[..., 0], {"definition": "consecutive pairs counted"})},
        coords={"domain": names if names is not None else [""], "layer": ds.layer.values})
    if names is None:
        res = res.squeeze("domain", drop=True)
    return _labelled(res, ds, metric="consecutive-token repetition")


def saturation(a: xr.Dataset, b: xr.Dataset, k: int | None = None) -> xr.Dataset:
    """OLMoE's router saturation between two traces of the same tokens (e.g. an early and the final checkpoint):
    per layer the mean |E_a(x) ∩ E_b(x)| / k over tokens (first k ranks, default all), top-1 agreement and the
    top-k Jaccard |A ∩ B| / |A ∪ B|, with their uniform-random values."""
    a, b = routed_view(a), routed_view(b)
    if a.sizes["token"] != b.sizes["token"] or list(a.layer.values) != list(b.layer.values):
        raise ValueError(f"the traces differ: {a.sizes['token']} vs {b.sizes['token']} tokens, layers "
                         f"{a.layer.values.tolist()} vs {b.layer.values.tolist()}")
    E = expert_count(a)
    k = min(a.sizes["k"], b.sizes["k"]) if k is None else int(k)
    if not 1 <= k <= min(a.sizes["k"], b.sizes["k"]):
        raise ValueError(f"k must be between 1 and {min(a.sizes['k'], b.sizes['k'])}, got {k}")
    same_tokens = "input_ids" in a and "input_ids" in b
    out = np.zeros((a.sizes["layer"], 4))
    source_b = b.encoding.get("source")
    read_b = token_reader(b.topk_ids, source_b)
    read_tokens = token_reader(b.input_ids, source_b) if same_tokens else None
    scanned = [a.topk_ids, a.input_ids] if same_tokens else [a.topk_ids]
    for s, e, blocks in scan_blocks(a, scanned):
        if same_tokens and not np.array_equal(blocks[1], read_tokens(s, e)):
            raise ValueError(f"the traces route different tokens (first difference in positions {s}..{e})")
        count_overlap(blocks[0], np.ascontiguousarray(read_b(s, e)).astype(blocks[0].dtype), k, out)
    n = np.maximum(out[:, 0], 1)
    jaccard = sum(math.comb(k, i) * math.comb(E - k, k - i) / math.comb(E, k) * i / (2 * k - i)
                  for i in range(k + 1))
    res = xr.Dataset(
        {"saturation": ("layer", out[:, 1] / n / k, {"definition": "mean |E_a ∩ E_b| / k", "baseline": k / E}),
         "top1": ("layer", out[:, 2] / n, {"definition": "same first choice", "baseline": 1 / E}),
         "jaccard": ("layer", out[:, 3] / n, {"definition": "mean |E_a ∩ E_b| / |E_a ∪ E_b|", "baseline": jaccard})},
        coords={"layer": a.layer.values})
    return _labelled(res, a, metric="router saturation", k_compared=k)


def cross_layer(ds: xr.Dataset, pairs: Sequence[tuple[int, int]] | None = None, *,
                top1: bool = False) -> xr.Dataset:
    """Joint routing across layers: for each (layer_from, layer_to) pair (default: consecutive routed layers),
    N(i, j) = tokens routed to i in layer_from and to j in layer_to (all k x k rank combinations, or first
    choices with top1), and the conditional N(i, j) / N_from(i) (uniform: k/E, or 1/E with top1)."""
    ds = routed_view(ds)
    E, k = expert_count(ds), ds.sizes["k"]
    layers = [int(x) for x in ds.layer.values]
    pairs = list(zip(layers[:-1], layers[1:])) if pairs is None else [(int(p), int(q)) for p, q in pairs]
    missing = sorted({x for pair in pairs for x in pair} - set(layers))
    if missing or not pairs:
        raise ValueError(f"layer pairs must name routed layers {layers}; not found: {missing or 'no pairs'}")
    index = np.asarray([[layers.index(p), layers.index(q)] for p, q in pairs], np.int64)
    top = 1 if top1 else k
    (counts,) = accumulate(ds, [ds.topk_ids], cross_step, [((len(pairs), E, E), np.int64)], params=(index, top))
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = counts / (counts.sum(-1, keepdims=True) / top)
    dims = ("pair", "expert_i", "expert_j")
    out = xr.Dataset(
        {"counts": (dims, counts, {"definition": "tokens routed to i in layer_from and j in layer_to"}),
         "conditional": (dims, conditional, {"definition": "N(i, j) / N_from(i)", "baseline": top / E})},
        coords={"pair": np.arange(len(pairs)), "layer_from": ("pair", [p for p, _ in pairs]),
                "layer_to": ("pair", [q for _, q in pairs]), "expert_i": np.arange(E), "expert_j": np.arange(E)})
    return _labelled(out, ds, metric="cross-layer joint routing", top1=int(top1))


# ---------------------------------------------------------------- router confidence and super experts


def router_confidence(ds: xr.Dataset, *, bins: int = 20) -> xr.Dataset:
    """Per layer, how decided the router is: mean entropy (bits) of its distribution over experts and mean
    top-1 minus top-2 probability, with histograms of both (entropy normalised to [0, 1]). Uses `router_scores`
    (normalised to sum 1) if recorded, else `router_logits` (softmax), else `topk_weights` (over the k chosen)."""
    ds = routed_view(ds)
    for var, logits in (("router_scores", False), ("router_logits", True), ("topk_weights", False)):
        if var in ds:
            break
    else:
        raise ValueError("router confidence needs router_scores, router_logits or topk_weights")
    values = dims_first(ds[var].sel(layer=ds.layer.values), "layer", "token")
    L = ds.sizes["layer"]
    sums, hist_h, hist_m = accumulate(ds, [values], confidence_step,
                                       [((L, 3), np.int64), ((L, bins), np.int64), ((L, bins), np.int64)],
                                       params=(logits,))
    units = np.maximum(sums[:, 0], 1) * FIXED_POINT  # a mean's denominator: tokens in sum units
    size = values.shape[-1]
    edges = np.linspace(0, 1, bins + 1)
    out = xr.Dataset(
        {"entropy": ("layer", sums[:, 1] / units,
                     {"definition": f"mean entropy in bits over {size} {var} entries", "maximum": math.log2(size)}),
         "margin": ("layer", sums[:, 2] / units, {"definition": "mean top-1 minus top-2 probability"}),
         "entropy_hist": (("layer", "bin"), hist_h, {"definition": "tokens per bin of entropy / log2(n)"}),
         "margin_hist": (("layer", "bin"), hist_m, {"definition": "tokens per bin of the margin"}),
         "tokens": ("layer", sums[:, 0])},
        coords={"layer": ds.layer.values, "bin": (edges[:-1] + edges[1:]) / 2})
    return _labelled(out, ds, metric="router confidence", source=var)


def super_experts(ds: xr.Dataset, *, quantile: float = 0.995, ratio: float = 0.1) -> xr.Dataset:
    """Super experts: per (layer, expert), the maximum |output| of its down projection over the tokens it served
    (`experts_out`, recorded with names=["layers.*.experts.out"]) and where it occurred. An expert is flagged
    when its maximum exceeds the `quantile` of all experts' maxima and `ratio` times the largest."""
    ds = routed_view(ds)
    if "experts_out" not in ds:
        raise ValueError("super experts need experts_out: trace with names=['layers.*.experts.out'] (or cache it)")
    E, L = expert_count(ds), ds.sizes["layer"]
    out = dims_first(ds.experts_out.sel(layer=ds.layer.values), "layer", "token", "k")
    token0 = int(ds.token.values[0]) if ds.sizes["token"] else 0
    best, where_token, where_dim = accumulate(
        ds, [ds.topk_ids, out], max_abs_step,
        [((L, E), np.float64, -np.inf), ((L, E), np.int64, -1), ((L, E), np.int64, -1)], params=(token0,),
        merge=later_max)
    best = np.where(np.isfinite(best), best, np.nan)
    seen = best[np.isfinite(best)]
    threshold = max(np.quantile(seen, quantile), ratio * seen.max()) if seen.size else np.nan
    dims = ("layer", "expert")
    res = xr.Dataset(
        {"max_abs": (dims, best, {"definition": "max |experts.out| over the tokens routed to the expert"}),
         "token": (dims, where_token, {"definition": "token position of that maximum (-1: never routed)"}),
         "hidden": (dims, where_dim, {"definition": "hidden dimension of that maximum"}),
         "super": (dims, best > threshold, {"definition": f"max_abs > max(quantile {quantile}, {ratio} x largest)"})},
        coords={"layer": ds.layer.values, "expert": np.arange(E)})
    return _labelled(res, ds, metric="super experts", threshold=float(threshold))
