"""The schema of routing Datasets, stored (`workbench.store`) or built in memory (`analysis.from_cache`): which
variable a hook point becomes, with which dims, dtype and fill value (docs/architecture.md, "Store schema").

- dims `token` and `layer`, both coordinates: the absolute token position and the checkpoint's own layer
  numbers (the routed layers plus the layers of any named hook); `k`; and per-hook trailing dims `hidden`
  (`hc`, `hidden` under hyper-connections), `expert`, `intermediate` (per-expert hidden), `vocab`, and
  `sae_k` for an SAE's stored latents (`x_y_sae_ids`, `x_y_sae_values`: `workbench.store.layout`).
  A trailing dim whose size clashes with a dim of that name is prefixed with its variable's name.
- `input_ids(token)` int32, and the routing of every routed layer at every token: `topk_ids(layer, token, k)`
  int16 (fill -1) and `topk_weights(layer, token, k)` float16 (fill NaN). float16 keeps 11 significant bits
  (relative error <= 2**-11), ample for weights between 0 and the routed scaling factor; it halves float32's
  bytes and, unlike bfloat16, is native to numpy, zarr and xarray.
- A named hook `layers.{i}.a.b` is held in variable `a_b(layer, token, ...)`; one outside the layers
  (`final.norm_out`, `logits`) in `final_norm_out(token, ...)`: dots become underscores, bfloat16 becomes
  float32. Layers a variable does not cover (dense layers in `topk_*`) read as its fill value.
- `router.margin` [B, T] becomes `router_margin(layer, token)` (NaN at hash-routed layers, which have none);
  V4's `attn.indexer_topk` becomes `attn_indexer_topk(layer, token, pick)`.
- A generation trace adds `generated(token)` bool: True where the model wrote the token, False in the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# the variables every routing Dataset holds: the token ids, and each routed layer's chosen experts and weights
INPUT_IDS, TOPK_IDS, TOPK_WEIGHTS = ROUTING_VARIABLES = ("input_ids", "topk_ids", "topk_weights")
DTYPES = {INPUT_IDS: np.dtype(np.int32), TOPK_IDS: np.dtype(np.int16), TOPK_WEIGHTS: np.dtype(np.float16)}
# a generation trace's marks (token): True where the model wrote the token, False in the prompt
GENERATED = "generated"
# hook kinds (a hook point's name less its `layers.{i}.` prefix): the routing comes from the first two, at every
# routed layer; the last dim of the other two is the number of experts
ROUTER_TOPK_IDS, ROUTER_TOPK_WEIGHTS = ROUTING_HOOKS = ("router.topk_ids", "router.topk_weights")
ROUTER_LOGITS, ROUTER_SCORES = "router.logits", "router.scores"
ROUTER_MARGIN = "router.margin"  # [B, T]: k-th minus (k+1)-th selection score, stored as router_margin(layer, token)
_ROUTING = {ROUTER_TOPK_IDS: TOPK_IDS, ROUTER_TOPK_WEIGHTS: TOPK_WEIGHTS}
# trailing dim names per hook kind (right-aligned: resid [H] -> hidden, [hc, H] -> hc, hidden)
_HIDDEN = ("hc", "hidden")
TRAILING_DIMS = {
    **{s: _HIDDEN for s in ("resid_pre", "resid_mid", "resid_post", "attn.out", "shared.out", "moe.out",
                            "mlp.out", "final.norm_out")},
    ROUTER_LOGITS: ("expert",), ROUTER_SCORES: ("expert",), ROUTER_TOPK_IDS: ("k",), ROUTER_TOPK_WEIGHTS: ("k",),
    ROUTER_MARGIN: (), "attn.indexer_topk": ("pick",),
    "experts.hidden": ("k", "intermediate"), "experts.out": ("k", "hidden"), "logits": ("vocab",),
}
SAE_DIMS = ("hc", "sae_k")  # an SAE's stored latents `<kind>.sae_ids` / `.sae_values` (workbench.store.layout)


def trailing_names(kind: str) -> tuple[str, ...]:
    """The trailing dim names of a hook kind (right-aligned), () where none are known."""
    return SAE_DIMS if kind.endswith((".sae_ids", ".sae_values")) else TRAILING_DIMS.get(kind, ())


def layer_of(hook: str) -> int | None:
    """The layer number of hook point `layers.{i}.…`; None for one outside the layers (`final.norm_out`)."""
    parts = hook.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def hook_kind(hook: str) -> str:
    """A hook point's name less its `layers.{i}.` prefix: `layers.3.router.logits` -> `router.logits`."""
    return hook.split(".", 2)[2] if layer_of(hook) is not None else hook


def variable_name(hook: str) -> str:
    """The variable holding a hook point: `topk_ids` and `topk_weights` for the routing, else its kind with dots
    as underscores (`layers.3.experts.out` -> `experts_out`)."""
    kind = hook_kind(hook)
    return _ROUTING.get(kind, kind.replace(".", "_"))


def numpy_dtype(dtype: torch.dtype | np.dtype) -> np.dtype:
    """A hook tensor's dtype in numpy: bfloat16, which numpy lacks, as float32."""
    if isinstance(dtype, torch.dtype):
        return np.dtype(np.float32) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
    return np.dtype(dtype)


def fill_value(dtype: np.dtype) -> Any:
    """What a variable of `dtype` reads where nothing was recorded: NaN, -1 for signed integers, else 0."""
    return np.nan if dtype.kind == "f" else -1 if dtype.kind == "i" else 0


def trailing_dims(var: str, names: tuple[str, ...], trailing: tuple[int, ...], sizes: dict[str, int]) -> list[str]:
    """Dim names of variable `var`'s trailing axes: the last of `names` (the hook kind's), else `{var}_dim{j}`; a
    name already sized differently in `sizes` becomes `{var}_{name}`. Records the sizes it uses in `sizes`."""
    dims = list(names[len(names) - len(trailing):] if len(trailing) <= len(names) else
                [f"{var}_dim{j}" for j in range(len(trailing))])
    for j, (d, size) in enumerate(zip(dims, trailing)):
        if sizes.setdefault(d, size) != size:
            dims[j] = f"{var}_{d}"
            sizes[dims[j]] = size
    return dims


@dataclass
class Variable:
    """One data variable: the hook points it holds (each at its index on the layer axis), dims, shape, dtype."""

    name: str
    kind: str  # the hook kind of its hook points
    hooks: dict[str, int | None]  # hook name -> index on the layer axis; None: no layer axis
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def layered(self) -> bool:
        return self.dims[0] == "layer"

    @property
    def trailing(self) -> tuple[int, ...]:
        """The shape after the layer and token axes: one token's value at one layer."""
        return self.shape[2 if self.layered else 1:]

    @property
    def fill(self) -> Any:
        return fill_value(self.dtype)

    @property
    def hook(self) -> str:
        """The hook name pattern, `layers.{layer}.` standing for the layer."""
        return f"layers.{{layer}}.{self.kind}" if self.layered else self.kind


def layers_of(hooks: Iterable[str]) -> list[int]:
    """The layer coordinate of a Dataset holding these hook points: their layer numbers, in order."""
    return sorted({i for i in map(layer_of, hooks) if i is not None})


def variables(hooks: Mapping[str, tuple[tuple[int, ...], torch.dtype | np.dtype]], tokens: int) -> list[Variable]:
    """The variables of a Dataset of `tokens` tokens holding hook points with these (trailing shape, dtype): one
    per variable name, in the order of their first hook points, shaped and typed after that first one; the
    layer axis is `layers_of(hooks)`."""
    layers = layers_of(hooks)
    index = {layer: j for j, layer in enumerate(layers)}
    sizes = {"token": tokens, "layer": len(layers)}
    groups: dict[str, list[str]] = {}
    for hook in hooks:
        groups.setdefault(variable_name(hook), []).append(hook)
    out = []
    for name, members in groups.items():
        trailing, dtype = hooks[members[0]]
        kind = hook_kind(members[0])
        dtype = DTYPES[name] if name in DTYPES else numpy_dtype(dtype)
        dims = trailing_dims(name, trailing_names(kind), tuple(trailing), sizes)
        if layer_of(members[0]) is None:
            out.append(Variable(name, kind, dict.fromkeys(members), ("token", *dims), (tokens, *trailing), dtype))
        else:
            out.append(Variable(name, kind, {h: index[layer_of(h)] for h in members}, ("layer", "token", *dims),
                                (len(layers), tokens, *trailing), dtype))
    return out
