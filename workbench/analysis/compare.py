"""Comparing two routings of the same tokens: two stores, two in-memory traces, or an engine's dump
(`workbench.engines`) against our own run, token block by token block."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import xarray as xr

from ..errors import InputError
from .dataset import hash_routed, routed_view
from .scan import scan_blocks, token_reader

NEVER = -1  # first_divergence of a token routed alike at every layer


def paired(a: xr.Dataset, b: xr.Dataset, what: str) -> tuple[xr.Dataset, xr.Dataset, Callable, Callable | None]:
    """Two routings of the same tokens as routed views, with readers of `b`'s ids and (where both hold them) its
    input_ids by token range; InputError if their layers, token counts or k differ."""
    a, b = routed_view(a), routed_view(b)
    la, lb = a.layer.values.tolist(), b.layer.values.tolist()
    if la != lb or a.sizes["token"] != b.sizes["token"] or a.sizes["k"] != b.sizes["k"]:
        raise InputError(f"{what}: the routings differ in shape: {a.sizes['token']} vs {b.sizes['token']} tokens, "
                         f"k {a.sizes['k']} vs {b.sizes['k']}, layers {la} vs {lb}")
    source_b = b.encoding.get("source")
    same_tokens = "input_ids" in a and "input_ids" in b
    return a, b, token_reader(b.topk_ids, source_b), token_reader(b.input_ids, source_b) if same_tokens else None


def compare(a: xr.Dataset, b: xr.Dataset) -> xr.Dataset:
    """Per layer, `agreement` (share of tokens given the same set of experts) and `jaccard` (mean |A ∩ B| / |A ∪ B|
    of the sets); per token, `first_divergence` (the first layer number whose sets differ, NEVER = -1 if none).
    The two must route the same tokens (the same input_ids where both hold them) at the same layers with one k."""
    a, b, read_b, read_tokens = paired(a, b, "compare")
    same_tokens, la = read_tokens is not None, a.layer.values.tolist()
    layers = np.asarray(la, np.int64)
    n = a.sizes["token"]
    agree, jaccard = np.zeros(len(la)), np.zeros(len(la))
    first = np.full(n, NEVER, np.int64)
    for s, e, blocks in scan_blocks(a, [a.topk_ids, a.input_ids] if same_tokens else [a.topk_ids]):
        if same_tokens and not np.array_equal(blocks[1], read_tokens(s, e)):
            raise InputError(f"compare: the routings are of different tokens (first difference in positions {s}..{e})")
        x, y = blocks[0], np.asarray(read_b(s, e))  # [L, t, k]
        # |A ∩ B| [L, t] of k distinct ids each, a layer at a time (a k x k comparison per token)
        shared = np.stack([(xl[:, :, None] == yl[:, None, :]).any(-1).sum(-1) for xl, yl in zip(x, y)])
        same = shared == x.shape[-1]
        agree += same.sum(1)
        jaccard += (shared / (2 * x.shape[-1] - shared)).sum(1)
        differ = ~same
        first[s:e] = np.where(differ.any(0), layers[differ.argmax(0)], NEVER)
    return xr.Dataset(
        {"agreement": ("layer", agree / max(n, 1), {"definition": "share of tokens with the same expert set"}),
         "jaccard": ("layer", jaccard / max(n, 1), {"definition": "mean |A ∩ B| / |A ∪ B| of the expert sets"}),
         "first_divergence": ("token", first, {"definition": "first layer whose expert sets differ",
                                               "fill": NEVER})},
        coords={"layer": layers, "token": a.token.values, "hash_routed": hash_routed(a)},
        attrs={"metric": "routing comparison", "k": int(a.sizes["k"]), "tokens": int(n)})
