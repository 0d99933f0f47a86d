"""Comparing two routings of the same tokens: two stores, two in-memory traces, or an engine's dump
(`workbench.engines`) against our own run, token block by token block."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import InputError
from .cluster import accumulate
from .dataset import hash_routed, routed_view

NEVER = -1  # first_divergence of a token routed alike at every layer


def paired(a: xr.Dataset, b: xr.Dataset, what: str) -> tuple[list[xr.DataArray], list[str | None], bool]:
    """What a block scan of two routings of the same tokens reads: a's and b's topk_ids (routed views), then
    their input_ids where both hold them, with each one's store path; InputError if their layers, token counts
    or k differ."""
    a, b = routed_view(a), routed_view(b)
    la, lb = a.layer.values.tolist(), b.layer.values.tolist()
    if la != lb or a.sizes["token"] != b.sizes["token"] or a.sizes["k"] != b.sizes["k"]:
        raise InputError(f"{what}: the routings differ in shape: {a.sizes['token']} vs {b.sizes['token']} tokens, "
                         f"k {a.sizes['k']} vs {b.sizes['k']}, layers {la} vs {lb}")
    same_tokens = "input_ids" in a and "input_ids" in b
    das = [a.topk_ids, b.topk_ids] + ([a.input_ids, b.input_ids] if same_tokens else [])
    sources = [a.encoding.get("source"), b.encoding.get("source")] * (2 if same_tokens else 1)
    return das, sources, same_tokens


def same_tokens_or_raise(what: str, start: int, x: np.ndarray, y: np.ndarray) -> None:
    """InputError unless the token ids `x` and `y` of one block (first position `start`) agree."""
    if not np.array_equal(x, y):
        raise InputError(f"{what}: the routings are of different tokens (first difference in positions "
                         f"{start}..{start + len(x)})")


def compare(a: xr.Dataset, b: xr.Dataset) -> xr.Dataset:
    """Per layer, `agreement` (share of tokens given the same set of experts) and `jaccard` (mean |A ∩ B| / |A ∪ B|
    of the sets); per token, `first_divergence` (the first layer number whose sets differ, NEVER = -1 if none).
    The two must route the same tokens (the same input_ids where both hold them) at the same layers with one k.
    Scans here, or on a dask.distributed cluster where both are stores (as every analysis does)."""
    das, sources, same_tokens = paired(a, b, "compare")
    a = routed_view(a)
    layers, n, k = a.layer.values.astype(np.int64), a.sizes["token"], a.sizes["k"]
    shared, first = accumulate(a, das, _compare_block, [((len(layers), k + 1), np.int64), ((n,), np.int64)],
                               params=(layers, same_tokens), sources=sources)
    overlap = np.arange(k + 1)
    agree = shared[:, k] / max(n, 1)
    jaccard = (shared * (overlap / (2 * k - overlap))).sum(1) / max(n, 1)
    return xr.Dataset(
        {"agreement": ("layer", agree, {"definition": "share of tokens with the same expert set"}),
         "jaccard": ("layer", jaccard, {"definition": "mean |A ∩ B| / |A ∪ B| of the expert sets"}),
         "first_divergence": ("token", first + NEVER, {"definition": "first layer whose expert sets differ",
                                                       "fill": NEVER})},
        coords={"layer": layers, "token": a.token.values, "hash_routed": hash_routed(a)},
        attrs={"metric": "routing comparison", "k": int(k), "tokens": int(n)})


def _compare_block(start: int, arrays: list[np.ndarray], acc: list[np.ndarray], layers: np.ndarray,
                   same_tokens: bool) -> None:
    """One block of `compare`: [a ids, b ids, (a input_ids, b input_ids)] counted into (tokens per layer and
    overlap |A ∩ B|, first divergent layer per token minus NEVER, so that blocks add up)."""
    shared_count, first = acc
    if same_tokens:
        same_tokens_or_raise("compare", start, arrays[2], arrays[3])
    x, y = arrays[0], np.asarray(arrays[1])  # [L, t, k]
    # |A ∩ B| [L, t] of k distinct ids each, a layer at a time (a k x k comparison per token)
    shared = np.stack([(xl[:, :, None] == yl[:, None, :]).any(-1).sum(-1) for xl, yl in zip(x, y)])
    for i, row in enumerate(shared):
        shared_count[i] += np.bincount(row, minlength=shared_count.shape[1])
    differ = shared != x.shape[-1]
    first[start:start + x.shape[1]] = np.where(differ.any(0), layers[differ.argmax(0)], NEVER) - NEVER
