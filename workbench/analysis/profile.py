"""One expert's profile at one layer, as feature dashboards show one latent: the input tokens it takes most
often, the positions where it weighs most (each with the surrounding token ids), its share of each domain's
tokens, its load along the sequence and its strongest co-activation partners. Expert ids are local to a layer,
so every field is of that layer alone.

The scan reads the layer's routing in blocks of `BLOCK_ENTRIES` routing entries; what it keeps is bounded by
the vocabulary (two counts per token id), the number of experts and `bins`, whatever the store's length.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .dataset import ArrayLike, dims_first, expert_count, label_codes, routed_view
from .scan import token_reader

BLOCK_ENTRIES = 1 << 20  # routing entries (tokens x k) read per block


def _grow(a: np.ndarray, size: int, fill: float) -> np.ndarray:
    return a if len(a) >= size else np.concatenate([a, np.full(size - len(a), fill, a.dtype)])


def expert_profile(ds: xr.Dataset, layer: int, expert: int, *, labels: ArrayLike | None = None, tokens: int = 10,
                   context: int = 8, bins: int = 20, partners: int = 10) -> xr.Dataset:
    """The profile of `expert` at `layer` (a token "takes" the expert when it is among its top-k):

    - `frequent_*(top)`: the `tokens` input ids that take it most often (count, then id), with how often each
      occurs at all, and an example position (where its weight was highest, else its first) in context;
    - `strongest_*(strong)`: the `tokens` positions with the highest routing weight on it (weight, then
      position), in context (needs `topk_weights`; empty without);
    - `*_context(…, offset)`: input ids at position + offset for offset in [-context, context], -1 outside;
    - `domain_*(domain)` with `labels` (one per token): N(e, domain) / N(domain), baseline k/E;
    - `position_share(bin)`: its share of the routing slots of each of `bins` equal position bins, baseline 1/E;
    - `partner_*(partner)`: the `partners` experts most often in the same top-k, N(e, j) and N(e, j) / N(e).
    """
    ds = routed_view(ds)
    E, n, k = expert_count(ds), ds.sizes["token"], ds.sizes["k"]
    layers = [int(x) for x in ds.layer.values]
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in layers:
        raise ValueError(f"layer must be one of the routed layers {layers}, got {layer!r}")
    for name, value, lo, hi in (("expert", expert, 0, E - 1), ("tokens", tokens, 1, 1 << 20),
                                ("context", context, 0, 4096), ("bins", bins, 1, 1 << 20),
                                ("partners", partners, 0, 1 << 20)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise ValueError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")
    if "input_ids" not in ds:
        raise ValueError("the Dataset has no input_ids: an expert profile shows the tokens an expert takes")
    layer, expert = int(layer), int(expert)
    codes, names = label_codes(labels, n) if labels is not None else (None, np.array([], str))
    source = ds.encoding.get("source")
    read_ids = token_reader(ds.topk_ids.sel(layer=[layer]), source)
    read_inputs = token_reader(ds.input_ids, source)
    weighted = "topk_weights" in ds
    if weighted:
        read_weights = token_reader(dims_first(ds.topk_weights, "layer", "token", "k").sel(layer=[layer]), source)

    nb = min(bins, n)
    slots, hits = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
    partner_counts = np.zeros(E, np.int64)
    occurrences, taken = np.zeros(0, np.int64), np.zeros(0, np.int64)
    best_weight, best_position = np.zeros(0, np.float64), np.zeros(0, np.int64)
    strong_position, strong_weight = np.zeros(0, np.int64), np.zeros(0, np.float64)
    domain_tokens, domain_counts = np.zeros(len(names), np.int64), np.zeros(len(names), np.int64)
    for s in range(0, n, max(1, BLOCK_ENTRIES // k)):
        e = min(s + max(1, BLOCK_ENTRIES // k), n)
        ids = np.asarray(read_ids(s, e)[0])  # [tokens, k]
        inputs = np.asarray(read_inputs(s, e)).astype(np.int64)
        chosen = ids == expert
        hit = chosen.any(1)
        position = np.arange(s, e)
        b = position * nb // n
        slots += np.bincount(b, weights=(ids >= 0).sum(1), minlength=nb).astype(np.int64)
        hits += np.bincount(b[hit], minlength=nb)
        rows = ids[hit]
        partner_counts += np.bincount(rows[(rows >= 0) & (rows != expert)].astype(np.int64), minlength=E)
        size = int(inputs.max()) + 1 if len(inputs) else 0
        occurrences, taken = _grow(occurrences, size, 0), _grow(taken, size, 0)
        best_weight, best_position = _grow(best_weight, size, -np.inf), _grow(best_position, size, -1)
        occurrences[:size] += np.bincount(inputs, minlength=size)
        taken[:size] += np.bincount(inputs[hit], minlength=size)
        if codes is not None:
            domain_tokens += np.bincount(codes[s:e], minlength=len(names))
            domain_counts += np.bincount(codes[s:e][hit], minlength=len(names))
        p, t = position[hit], inputs[hit]
        if weighted:
            w = np.where(chosen, np.asarray(read_weights(s, e)[0], np.float64), 0.0).sum(1)[hit]
            strong_position, strong_weight = np.append(strong_position, p), np.append(strong_weight, w)
            keep = np.lexsort((strong_position, -strong_weight))[:tokens]
            strong_position, strong_weight = strong_position[keep], strong_weight[keep]
        else:
            w = np.zeros(len(p))
        order = np.lexsort((p, -w))  # per id, its highest weight first, the earliest position among ties
        first_ids, first = np.unique(t[order], return_index=True)
        better = w[order][first] > best_weight[first_ids]  # strict: an earlier block keeps ties
        best_weight[first_ids[better]] = w[order][first][better]
        best_position[first_ids[better]] = p[order][first][better]

    seen = np.flatnonzero(taken)
    top = seen[np.lexsort((seen, -taken[seen]))][:tokens]
    partner_order = np.lexsort((np.arange(E), -partner_counts))
    partner_order = partner_order[partner_counts[partner_order] > 0][:partners]
    count = int(hits.sum())

    def around(positions: np.ndarray) -> np.ndarray:
        out = np.full((len(positions), 2 * context + 1), -1, np.int64)
        for i, q in enumerate(positions):
            lo, hi = max(0, q - context), min(n, q + context + 1)
            out[i, lo - (q - context):hi - (q - context)] = np.asarray(read_inputs(int(lo), int(hi)))
        return out

    edges = -(-np.arange(nb + 1) * n // nb)  # bin b holds positions p with p * nb // n == b
    with np.errstate(invalid="ignore", divide="ignore"):
        domain_share = domain_counts / domain_tokens
        coact = partner_counts[partner_order] / count
    out = xr.Dataset(
        {"frequent_ids": ("top", top, {"definition": "input ids that take the expert most often"}),
         "frequent_count": ("top", taken[top], {"definition": "tokens with this id that took the expert"}),
         "frequent_occurrences": ("top", occurrences[top], {"definition": "tokens with this id"}),
         "frequent_position": ("top", best_position[top], {"definition": "example position (highest weight)"}),
         "frequent_context": (("top", "offset"), around(best_position[top])),
         "strongest_position": ("strong", strong_position, {"definition": "positions of the highest weights"}),
         "strongest_ids": ("strong", np.asarray([], np.int64) if not len(strong_position) else
                           around(strong_position)[:, context]),
         "strongest_weight": ("strong", strong_weight, {"definition": "routing weight on the expert"}),
         "strongest_context": (("strong", "offset"), around(strong_position)),
         "domain_tokens": ("domain", domain_tokens, {"definition": "N(domain)"}),
         "domain_count": ("domain", domain_counts, {"definition": "N(e, domain)"}),
         "domain_share": ("domain", domain_share, {"definition": "N(e, domain) / N(domain)", "baseline": k / E}),
         "position_share": ("bin", hits / np.maximum(slots, 1),
                            {"definition": "slots of the bin routed to the expert / slots of the bin",
                             "baseline": 1 / E}),
         "partner_expert": ("partner", partner_order, {"definition": "experts most often in the same top-k"}),
         "partner_count": ("partner", partner_counts[partner_order], {"definition": "N(e, j)"}),
         "partner_coactivation": ("partner", coact, {"definition": "N(e, j) / N(e)"})},
        coords={"offset": np.arange(-context, context + 1), "domain": names,
                "bin_start": ("bin", edges[:-1]), "bin_stop": ("bin", edges[1:])},
        attrs={"metric": "expert profile", "layer": layer, "expert": expert, "n_experts": E, "k": int(k),
               "tokens": int(n), "count": count, "share": count / max(int(slots.sum()), 1),
               "weighted": weighted})
    return out
