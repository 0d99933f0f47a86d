"""Load-rebalancing what-if: where each expert would go under DeepSeek's expert-parallel load balancer (EPLB), and
how even the GPUs' loads would be, from the load a trace measured (docs/references.md, "Expert load balancing").

The placement follows EPLB's published hierarchical policy (our implementation of its description): pack the
expert groups onto nodes so node loads are even, give the heaviest experts of each node extra replicas (each
replica takes an equal share of its expert's tokens), then pack each node's replicas onto its GPUs, the same
number per GPU. When the nodes do not divide the groups, the global policy treats everything as one group on one
node. Packing is greedy (heaviest first onto the lightest bin with room), so a layer where the contiguous
placement `workbench`'s own expert parallelism uses happens to be more even keeps that placement.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr

from .analysis import expert_load
from .errors import InputError


def rebalance(load: Any, *, gpus: int, nodes: int = 1, slots: int | None = None, groups: int = 1) -> xr.Dataset:
    """Per layer: the expert of each of `slots` physical slots (GPU g holds slots [g*S/G, (g+1)*S/G)), the replicas
    per expert, and per-GPU load with its max/mean, beside the contiguous placement without replicas.

    `load` is a routing Dataset (a store or `from_cache` trace), an `expert_load` result, or a [layer, expert] array
    of token counts. `slots` defaults to the number of experts (no replicas); `groups` is the router's expert groups
    (DeepSeek-V3: `n_group`, 8), which the hierarchical policy keeps whole on one node."""
    counts, layers, note = _counts(load)
    L, E = counts.shape
    S = E if slots is None else slots
    for name, value in (("gpus", gpus), ("nodes", nodes), ("slots", S), ("groups", groups)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InputError(f"rebalance: {name} must be a positive integer, got {value!r}")
    if S < E or S % gpus:
        raise InputError(f"rebalance: slots ({S}) must be at least the {E} experts and a multiple of gpus ({gpus})")
    if gpus % nodes:
        raise InputError(f"rebalance: gpus ({gpus}) must be a multiple of nodes ({nodes})")
    if E % groups:
        raise InputError(f"rebalance: groups ({groups}) must divide the {E} experts")
    hierarchical = groups % nodes == 0  # else EPLB's global policy: one group on one node
    packed_groups, nodes_used = (groups, nodes) if hierarchical else (1, 1)

    placement = np.empty((L, S), np.int64)
    kept_identity = np.zeros(L, bool)
    for i in range(L):
        plan = _hierarchical(counts[i], S, packed_groups, nodes_used, gpus)
        ident = _identity(counts[i], S, gpus)
        if ident is not None and _imbalance(_gpu_load(counts[i], ident, gpus)) < _imbalance(
                _gpu_load(counts[i], plan, gpus)):
            plan, kept_identity[i] = ident, True
        placement[i] = plan

    replicas = np.stack([np.bincount(p, minlength=E) for p in placement])
    gpu_load = np.stack([_gpu_load(c, p, gpus) for c, p in zip(counts, placement)])
    identity = np.stack([_contiguous_load(c, gpus) for c in counts])
    out = xr.Dataset(
        {"placement": (("layer", "slot"), placement, {"definition": "logical expert in each physical slot; "
                                                      "GPU g holds slots [g*S/G, (g+1)*S/G)"}),
         "replicas": (("layer", "expert"), replicas, {"definition": "physical slots holding the expert"}),
         "gpu_load": (("layer", "gpu"), gpu_load, {"definition": "routing slots per GPU, each replica taking an "
                                                   "equal share of its expert's"}),
         "identity_gpu_load": (("layer", "gpu"), identity, {"definition": "per GPU, experts in contiguous ranges "
                                                            "without replicas (workbench's expert parallelism)"}),
         "imbalance": ("layer", _imbalance(gpu_load), {"definition": "max / mean of gpu_load (1 = even)"}),
         "identity_imbalance": ("layer", _imbalance(identity), {"definition": "max / mean of identity_gpu_load"}),
         "kept_identity": ("layer", kept_identity, {"definition": "the contiguous placement was at least as even"})},
        coords={"layer": layers, "slot": np.arange(S), "expert": np.arange(E), "gpu": np.arange(gpus)},
        attrs={"policy": "hierarchical" if hierarchical else "global", "gpus": gpus, "nodes": nodes,
               "slots": S, "groups": groups, "tokens_note": note or ""})
    if note:
        warnings.warn(f"rebalance: {note}", stacklevel=2)
    return out


# ---------------------------------------------------------------- input


def _counts(load: Any) -> tuple[np.ndarray, np.ndarray, str | None]:
    """[layer, expert] float64 counts, the layer numbers, and a note when the tokens look random."""
    if isinstance(load, xr.Dataset):
        note = random_tokens_note(load) if "input_ids" in load else None
        table = load if "counts" in load and "topk_ids" not in load else expert_load(load)
        c = table.counts.transpose("layer", "expert")
        return c.values.astype(np.float64), c.layer.values, note
    if isinstance(load, xr.DataArray) and "layer" in load.dims:
        c = load.transpose("layer", ...)
        return np.asarray(c.values, np.float64), c.layer.values, None
    a = np.asarray(load.cpu() if hasattr(load, "cpu") else load, dtype=np.float64)
    if a.ndim != 2 or 0 in a.shape:
        raise InputError(f"rebalance: load must be [layer, expert] counts, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise InputError("rebalance: load must be finite and non-negative")
    return a, np.arange(a.shape[0]), None


def random_tokens_note(ds: xr.Dataset) -> str | None:
    """Why the Dataset's tokens look like uniform random ids (whose routing spreads unlike text's, so its load
    statistics overstate the imbalance of learned layers on real input), or None. A store made with
    `--random-tokens` records its seed; otherwise the ids' spread is compared with uniform draws."""
    if ds.attrs.get("seed") is not None:
        return "the trace was made of random tokens (its store records their seed); load measured on them " \
               "misstates what text would put on each expert"
    ids = np.asarray(ds.input_ids.values).ravel()
    n, vocab = ids.size, int(ids.max()) + 1 if ids.size else 0
    if n < 256 or vocab < 2:
        return None
    share = np.bincount(ids, minlength=vocab) / n
    if n >= 20 * vocab:  # every id expected many times: text puts far more on its commonest token than 2x uniform
        uniform = share.max() <= 2 / vocab
    else:  # ids mostly unseen: uniform draws repeat rarely, text repeats its common tokens
        expected = vocab * (1 - (1 - 1 / vocab) ** n)
        uniform = (share > 0).sum() >= 0.9 * expected
    return "the token ids are spread like uniform random ids; load measured on them misstates what text " \
           "would put on each expert" if uniform else None


# ---------------------------------------------------------------- the policy


def _pack(weights: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each item, every bin taking len/bins items: heaviest first, each onto the lightest bin with room
    (ties to the lower bin)."""
    per = len(weights) // bins
    where = np.empty(len(weights), np.int64)
    total, filled = np.zeros(bins), np.zeros(bins, np.int64)
    for item in np.argsort(-weights, kind="stable"):
        room = np.flatnonzero(filled < per)
        b = room[np.argmin(total[room])]
        where[item], total[b], filled[b] = b, total[b] + weights[item], filled[b] + 1
    return where


def _replicas(weights: np.ndarray, slots: int) -> np.ndarray:
    """Replicas per item for `slots` in all: each extra one goes to the item whose replicas carry the most each."""
    n = np.ones(len(weights), np.int64)
    for _ in range(slots - len(weights)):
        n[np.argmax(weights / n)] += 1
    return n


def _hierarchical(w: np.ndarray, slots: int, groups: int, nodes: int, gpus: int) -> np.ndarray:
    """One layer's placement: groups onto nodes, replicas within each node, replicas onto the node's GPUs."""
    E, per_node_gpus, per_gpu = len(w), gpus // nodes, slots // gpus
    group_of = np.arange(E) // (E // groups)
    node_of_group = _pack(w.reshape(groups, -1).sum(1), nodes)
    placement = np.empty(slots, np.int64)
    for node in range(nodes):
        experts = np.flatnonzero(node_of_group[group_of] == node)
        n = _replicas(w[experts], slots // nodes)
        copies = np.repeat(experts, n)  # one entry per replica
        gpu = _pack(np.repeat(w[experts] / n, n), per_node_gpus)
        for g in range(per_node_gpus):
            start = (node * per_node_gpus + g) * per_gpu
            placement[start:start + per_gpu] = copies[gpu == g]
    return placement


def _identity(w: np.ndarray, slots: int, gpus: int) -> np.ndarray | None:
    """Contiguous ranges as `workbench` splits experts (rank r: [r*E//G, (r+1)*E//G)); each GPU's spare slots
    repeat its own heaviest expert, which leaves its load unchanged. None when some GPU would hold no expert."""
    E, per_gpu = len(w), slots // gpus
    placement = np.empty(slots, np.int64)
    for g in range(gpus):
        own = np.arange(g * E // gpus, (g + 1) * E // gpus)
        if len(own) == 0:
            return None
        heaviest = own[np.argmax(w[own])]
        placement[g * per_gpu:(g + 1) * per_gpu] = np.concatenate([own, np.full(per_gpu - len(own), heaviest)])
    return placement


def _gpu_load(w: np.ndarray, placement: np.ndarray, gpus: int) -> np.ndarray:
    share = w / np.bincount(placement, minlength=len(w)).clip(min=1)
    return share[placement].reshape(gpus, -1).sum(1)


def _contiguous_load(w: np.ndarray, gpus: int) -> np.ndarray:
    E = len(w)
    return np.array([w[g * E // gpus:(g + 1) * E // gpus].sum() for g in range(gpus)])


def _imbalance(gpu_load: np.ndarray) -> np.ndarray:
    mean = gpu_load.mean(-1)
    return np.where(mean > 0, gpu_load.max(-1) / np.where(mean > 0, mean, 1), 1.0)
