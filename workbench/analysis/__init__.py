"""Routing analyses from the MoE literature over a routing Dataset: a store opened with `open_store` (dask-backed,
read chunk by chunk, never whole) or an in-memory trace built by `from_cache`. Both share one code path.

- `dataset`: building a routing Dataset in memory, the routed view and expert count every analysis reads.
- `scan`: reading token blocks, straight from a store's zarr chunks where it can.
- `cluster`: counting over the blocks, here or on a dask.distributed cluster.
- `kernels`: the numba kernels that count.
- `metrics`: the analyses, with their definitions.
- `profile`: one expert's profile at one layer (top tokens in context, domains, load along position, partners).
- `compare`: two routings of the same tokens side by side (agreement, Jaccard, first divergence per token).
- `fragility`: routing margins (k-th minus (k+1)-th selection score) and the flips between two runs they predict.
- `position`: routing by position over long stores; how far back DeepSeek-V4's CSA indexer picks reach.

For code of its own (the widgets are such code), `routed_view`, `expert_count` and `token_reader` are the same
entry points the analyses use: the routed layers in (layer, token, k) order, the expert count, and a reader of
token ranges that goes straight to a store's zarr chunks.

Layers are the checkpoint's own numbers. Hash-routed layers (DeepSeek-V4's first layers route by token id) are
kept; every per-layer result carries a `hash_routed(layer)` coordinate, detected from the data (`hash_routed`).
"""

from .cluster import TASKS_PER_THREAD
from .compare import compare
from .fragility import flips, margins
from .dataset import (HASH_MIN_REPEATS, HASH_PROBE_TOKENS, ArrayLike, expert_count, from_cache, hash_routed,
                      routed_view)
from .kernels import FIXED_POINT
from .metrics import (coactivation, cross_layer, domain_specialisation, eplb_weight, expert_load, mutual_information,
                      repetition, router_confidence, saturation, super_experts, vocabulary_specialisation)
from .position import by_position, pick_distances
from .profile import expert_profile
from .scan import BLOCK_BYTES, token_reader

__all__ = ["from_cache", "routed_view", "expert_count", "hash_routed", "token_reader", "expert_load", "eplb_weight",
           "coactivation", "domain_specialisation", "vocabulary_specialisation", "mutual_information", "repetition",
           "saturation", "compare", "margins", "flips", "by_position", "pick_distances", "expert_profile",
           "cross_layer", "router_confidence", "super_experts", "BLOCK_BYTES",
           "HASH_PROBE_TOKENS", "HASH_MIN_REPEATS", "TASKS_PER_THREAD", "FIXED_POINT", "ArrayLike"]
