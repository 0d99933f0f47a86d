"""Routing fragility: how near each token is to a change of its expert set, and which selections do change
between two runs of the same tokens (fp32 against bf16, two backends, two engines).

The margin of a token at a layer is the k-th minus the (k+1)-th selection score (`router.margin`, recorded with
names=["layers.*.router.margin"]; scores after the correction bias and group masking where the family applies
them). A selection can only change under a perturbation of the scores at least that large, so small margins
should predict flips. Margins are counted into fixed log-spaced bins (`FINE_PER_DECADE` per decade from
`LOG_MIN` to `LOG_MAX`, plus one bin below and one from LOG_MAX up, infinity included): quantiles, medians and
ROC AUC are exact to that bin resolution (a factor 10**(1/64), 3.7%), and streaming keeps memory flat on any
store.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ..errors import InputError
from .cluster import accumulate
from .compare import paired, same_tokens_or_raise
from .dataset import dims_first, hash_routed, routed_view

MARGIN = "router_margin"  # the store / from_cache variable of the `router.margin` hook
LOG_MIN, LOG_MAX, FINE_PER_DECADE = -10, 4, 64  # fine bins: 10**LOG_MIN .. 10**LOG_MAX, 64 per decade
EDGES = 10.0 ** (np.arange(LOG_MIN * FINE_PER_DECADE, LOG_MAX * FINE_PER_DECADE + 1) / FINE_PER_DECADE)
QUANTILES = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9)


def _bin(x: np.ndarray) -> np.ndarray:
    """Fine bin of each margin: 0 below EDGES[0] (zero included), len(EDGES) from EDGES[-1] up (inf included)."""
    return np.searchsorted(EDGES, x, side="right")


def _margins_of(ds: xr.Dataset) -> xr.DataArray:
    """The routed layers' margins as (layer, token); an error naming the hook when none were recorded."""
    if MARGIN not in ds:
        raise InputError("the Dataset has no router_margin: record it with names=['layers.*.router.margin'] "
                         "(trace or run_with_cache, then analysis.from_cache)")
    return dims_first(ds[MARGIN].sel(layer=ds.layer.values), "layer", "token")


def _quantiles(hist: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles [L, q] from fine histograms [L, bins], geometric within a bin (NaN for an empty layer)."""
    out = np.full((len(hist), len(qs)), np.nan)
    lo = np.concatenate([[0.0], EDGES])  # lower edge of each bin
    hi = np.concatenate([EDGES, [np.inf]])
    for i, h in enumerate(hist):
        total = h.sum()
        if not total:
            continue
        cum = np.cumsum(h)
        for j, q in enumerate(qs):
            b = int(np.searchsorted(cum, q * total, side="left"))
            inside = (q * total - (cum[b] - h[b])) / h[b]
            if b == 0:
                out[i, j] = lo[1] * inside  # below 1e-10: linear from 0
            elif b == len(h) - 1:
                out[i, j] = lo[b]  # from the top edge up (inf included): the edge is a lower bound
            else:
                out[i, j] = lo[b] * (hi[b] / lo[b]) ** inside
    return out


def _coarse(hist: np.ndarray, per_decade: int) -> tuple[np.ndarray, np.ndarray]:
    """(histograms [L, bins], edges [bins + 1]) at `per_decade` bins per decade, under- and overflow folded into
    the first and last bins."""
    if FINE_PER_DECADE % per_decade:
        raise InputError(f"per_decade must divide {FINE_PER_DECADE}; got {per_decade}")
    step = FINE_PER_DECADE // per_decade
    inner = hist[:, 1:-1]
    coarse = inner.reshape(len(hist), -1, step).sum(-1)
    coarse[:, 0] += hist[:, 0]
    coarse[:, -1] += hist[:, -1]
    return coarse, EDGES[::step]


def _margin_step(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], nearest: int) -> None:
    """Fine histograms and ties (margin 0) per layer, and the `nearest` smallest margins with their positions."""
    m = arrays[0]
    hist, ties, near_m, near_t = acc
    for i, row in enumerate(m):
        ok = ~np.isnan(row)
        hist[i] += np.bincount(_bin(row[ok]), minlength=hist.shape[1])
        ties[i] += np.count_nonzero(row == 0)
        if not nearest:
            continue
        pos = np.flatnonzero(ok)
        vals = row[ok].astype(np.float64)
        if len(vals) > nearest:
            keep = np.argpartition(vals, nearest - 1)[:nearest]
            pos, vals = pos[keep], vals[keep]
        _keep_smallest(near_m[i], near_t[i], vals, pos + start)


def _keep_smallest(best_m: np.ndarray, best_t: np.ndarray, vals: np.ndarray, pos: np.ndarray) -> None:
    """Fold (vals, pos) into the sorted smallest `len(best_m)` (margin, position) pairs, in place; ties go to
    the earlier position."""
    m, t = np.concatenate([best_m, vals]), np.concatenate([best_t, pos])
    order = np.lexsort((np.where(t < 0, np.iinfo(np.int64).max, t), m))[:len(best_m)]
    best_m[:], best_t[:] = m[order], t[order]


def _merge_margins(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    near_m, near_t = a[2].copy(), a[3].copy()
    for i in range(len(near_m)):
        _keep_smallest(near_m[i], near_t[i], b[2][i], b[3][i])
    return [a[0] + b[0], a[1] + b[1], near_m, near_t]


def margins(ds: xr.Dataset, *, per_decade: int = 4, nearest: int = 20,
            quantiles: Sequence[float] = QUANTILES) -> xr.Dataset:
    """Per layer, the distribution of the routing margin (k-th minus (k+1)-th selection score): `quantile`,
    `hist` over log-spaced bins (`per_decade` per decade, edges in `bin_edges`), the share of ties (margin 0)
    and, as `nearest_token` / `nearest_margin` / `nearest_id`, the `nearest` tokens nearest a flip (smallest
    margins, ties to the earlier position). Layers without margins (hash-routed) hold zero counts and NaN."""
    ds = routed_view(ds)
    values = _margins_of(ds)
    L = ds.sizes["layer"]
    hist, ties, near_m, near_t = accumulate(
        ds, [values], _margin_step,
        [((L, len(EDGES) + 1), np.int64), ((L,), np.int64), ((L, nearest), np.float64, np.inf),
         ((L, nearest), np.int64, -1)],
        params=(nearest,), merge=_merge_margins)
    positions = ds.token.values
    near_pos = np.where(near_t >= 0, positions[np.clip(near_t, 0, None)], -1)
    near_id = np.full(near_t.shape, -1, np.int64)
    if "input_ids" in ds and (near_t >= 0).any():
        wanted, back = np.unique(near_t[near_t >= 0], return_inverse=True)
        near_id[near_t >= 0] = ds.input_ids.isel(token=wanted).values[back]
    coarse, edges = _coarse(hist, per_decade)
    tokens = hist.sum(-1)
    out = xr.Dataset(
        {"margin_quantile": (("layer", "q"), _quantiles(hist, quantiles),
                      {"definition": "margin quantiles (to a factor 10**(1/64))"}),
         "median_margin": ("layer", _quantiles(hist, [0.5])[:, 0], {"definition": "median margin"}),
         "hist": (("layer", "bin"), coarse, {"definition": "tokens per log-spaced margin bin; the first bin holds "
                                             "everything below its upper edge (zero included), the last everything "
                                             "from its lower edge up (infinity included)"}),
         "bin_edges": ("edge", edges),
         "ties": ("layer", ties / np.maximum(tokens, 1), {"definition": "share of tokens with margin exactly 0"}),
         "tokens": ("layer", tokens, {"definition": "tokens with a recorded margin"}),
         "nearest_token": (("layer", "rank"), near_pos, {"definition": "positions of the smallest margins",
                                                         "fill": -1}),
         "nearest_margin": (("layer", "rank"), np.where(near_t >= 0, near_m, np.nan)),
         "nearest_id": (("layer", "rank"), near_id, {"definition": "their input token ids", "fill": -1})},
        coords={"layer": ds.layer.values, "q": list(quantiles), "rank": np.arange(nearest),
                "hash_routed": hash_routed(ds)},
        attrs={"metric": "routing margin", "definition": "k-th minus (k+1)-th selection score",
               "per_decade": per_decade, "k": int(ds.sizes["k"]), "tokens": int(ds.sizes["token"])})
    return out



def _flip_step(x: np.ndarray, y: np.ndarray, m: np.ndarray | None, hist: np.ndarray) -> np.ndarray:
    """Per (layer, token) of blocks [L, t, k], whether the expert sets differ; with margins m [L, t], counted into
    hist [L, 2, bins] (0: kept, 1: flipped; NaN margins skipped)."""
    flipped = (np.sort(x, -1) != np.sort(y, -1)).any(-1)
    if m is not None:
        for i in range(len(m)):
            ok = ~np.isnan(m[i])
            hist[i] += np.bincount(flipped[i][ok] * hist.shape[-1] + _bin(m[i][ok]),
                                   minlength=2 * hist.shape[-1]).reshape(2, -1)
    return flipped


def _flips_block(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], has_margin: bool,
                 same_tokens: bool) -> None:
    """One block of `flips`: [a ids, b ids, (a margins), (a input_ids, b input_ids)] counted into (margin
    histograms, flips per layer, flipped layers per token)."""
    hist, count, per_token = acc
    if same_tokens:
        same_tokens_or_raise("flips", start, arrays[-2], arrays[-1])
    flipped = _flip_step(arrays[0], arrays[1], arrays[2] if has_margin else None, hist)
    count += flipped.sum(1)
    per_token[start:start + flipped.shape[1]] = flipped.sum(0)


def _auc(kept: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of -margin as a score for flips, from fine histograms: P(a flipped token's margin is smaller than
    a kept one's), same-bin pairs counted half."""
    nf, nk = flipped.sum(), kept.sum()
    if not nf or not nk:
        return float("nan")
    above = nk - np.cumsum(kept)  # kept tokens in higher bins
    return float((flipped * (above + 0.5 * kept)).sum() / (nf * nk))


def flips(a: xr.Dataset, b: xr.Dataset) -> xr.Dataset:
    """Routing changes between two runs of the same tokens, `a` the reference (e.g. fp32) and `b` the other
    (e.g. bf16): per layer, `flips` and `flip_share` (tokens whose expert set differs), and where `a` holds
    `router_margin`, how well the margin predicts them: `auc` (ROC AUC of -margin for flips: 1 = every flipped
    token has a smaller margin than every kept one, 0.5 = no better than chance) and the median margin of
    flipped and kept tokens, with their log-binned histograms. Per token, `flipped_layers`: in how many layers
    its set changed."""
    das, sources, same_tokens = paired(a, b, "flips")
    a = routed_view(a)
    la = a.layer.values.tolist()
    has_margin = MARGIN in a
    if has_margin:  # a's margins between the ids and the token ids
        das.insert(2, _margins_of(a))
        sources.insert(2, a.encoding.get("source"))
    L, n = len(la), a.sizes["token"]
    hist, count, per_token = accumulate(
        a, das, _flips_block,
        [((L, 2, len(EDGES) + 1), np.int64), ((L,), np.int64), ((n,), np.int16)],
        params=(has_margin, same_tokens), sources=sources)
    kept_h, flip_h = hist[:, 0], hist[:, 1]
    with_margin = hist.sum((1, 2)) > 0
    nan = np.full(L, np.nan)
    auc = np.where(with_margin, [_auc(k, f) for k, f in zip(kept_h, flip_h)], nan)
    med_f = np.where(with_margin & (flip_h.sum(-1) > 0), _quantiles(flip_h, [0.5])[:, 0], nan)
    med_k = np.where(with_margin & (kept_h.sum(-1) > 0), _quantiles(kept_h, [0.5])[:, 0], nan)
    coarse_k, edges = _coarse(kept_h, 4)
    coarse_f, _ = _coarse(flip_h, 4)
    return xr.Dataset(
        {"flips": ("layer", count, {"definition": "tokens whose expert set differs between the runs"}),
         "flip_share": ("layer", count / max(n, 1), {"definition": "flips / tokens"}),
         "auc": ("layer", auc, {"definition": "ROC AUC of -margin (of run a) as a predictor of a flip; NaN "
                                "without margins or without flips"}),
         "median_margin_flipped": ("layer", med_f, {"definition": "median margin of the flipped tokens"}),
         "median_margin_kept": ("layer", med_k, {"definition": "median margin of the other tokens"}),
         "hist_flipped": (("layer", "bin"), coarse_f, {"definition": "flipped tokens per log-spaced margin bin"}),
         "hist_kept": (("layer", "bin"), coarse_k, {"definition": "other tokens per log-spaced margin bin"}),
         "bin_edges": ("edge", edges),
         "flipped_layers": ("token", per_token, {"definition": "layers whose expert set differs at the token"})},
        coords={"layer": np.asarray(la, np.int64), "token": a.token.values, "hash_routed": hash_routed(a)},
        attrs={"metric": "routing flips", "k": int(a.sizes["k"]), "tokens": int(n),
               "margins": "run a's router_margin" if has_margin else "none recorded"})
