"""Named hook points: declared where a tensor is made, switched on only while a hook is registered.

A module creates its points once (``self.hp_logits = hooks.point("layers.3.router.logits")``) and
passes the tensor through (``logits = self.hp_logits(logits)``). With nothing registered the call
returns its argument untouched, so an unhooked forward does no extra work.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import HookError, UnknownHookError
from .schema import hook_kind, layer_of

HookFn = Callable[[torch.Tensor, "HookContext"], "torch.Tensor | None"]


@dataclass(frozen=True)
class HookContext:
    """What a hook function is told besides the tensor: which point, which layer, which tokens."""

    name: str
    layer: int | None
    positions: torch.Tensor  # absolute token positions of the T axis, LongTensor[T]
    input_ids: torch.Tensor  # LongTensor[B, T] of the current forward
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. `topk_ids` for router.topk_weights / experts.*


class HookPoint:
    """One named place in the forward pass where hooks may read or replace a tensor."""

    __slots__ = ("name", "layer", "fns", "_registry")

    def __init__(self, name: str, registry: HookRegistry):
        self.name = name
        self.layer = layer_of(name)
        self.fns: list[HookFn] = []
        self._registry = registry

    @property
    def active(self) -> bool:
        """True while at least one hook is registered (modules skip optional work otherwise)."""
        return bool(self.fns)

    def __call__(self, x: torch.Tensor, **extra: Any) -> torch.Tensor:
        if not self.fns:
            return x
        ctx = HookContext(self.name, self.layer, self._registry.positions, self._registry.input_ids, extra)
        for fn in list(self.fns):
            out = fn(x, ctx)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor):
                raise HookError(f"hook on {self.name!r} returned {type(out).__name__}; return a tensor or None")
            if out.shape != x.shape:
                raise HookError(
                    f"hook on {self.name!r} returned shape {tuple(out.shape)}; expected {tuple(x.shape)}"
                )
            if _kind(out.dtype) != _kind(x.dtype):
                raise HookError(f"hook on {self.name!r} returned dtype {out.dtype}; expected {x.dtype} "
                                f"({_kind(x.dtype)} values: a replacement may change precision, not kind)")
            x = out.to(device=x.device, dtype=x.dtype)
        return x


def _kind(dtype: torch.dtype) -> str:
    """A dtype's kind: a hook may change a tensor's precision but not its kind (ids must stay integers)."""
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


# Where each hook sits inside a layer, in forward order; family-specific points (e.g. `attn.*`) fall
# in by prefix, others right after `resid_pre`.
_LAYER_ORDER = ("resid_pre", "", "hc.attn.", "attn.", "attn.out", "resid_mid", "hc.ffn.", "router.logits",
                "router.scores", "router.margin", "router.topk_ids", "router.topk_weights", "experts.hidden",
                "experts.out", "shared.out", "moe.out", "mlp.out", "resid_post")


def _forward_rank(name: str) -> tuple:
    if ".sae." in name:  # an SAE's points (workbench.sae) come right after the point it is spliced at
        return (*_forward_rank(name.split(".sae.")[0]), 1)
    layer = layer_of(name)
    if layer is None:
        final = ("final.hc_pre", "final.norm_out", "logits")
        return (float("inf"), final.index(name) if name in final else -1)
    suffix = hook_kind(name)
    rank = max(i for i, p in enumerate(_LAYER_ORDER) if suffix == p or (p.endswith(".") or not p) and suffix.startswith(p))
    return (layer, rank)


def match(pattern: str, names: Collection[str]) -> list[str]:
    """The hook names (of `names`, in their order) matching an exact name or a glob; a pattern matching none is
    an UnknownHookError naming the closest."""
    if pattern in names:
        return [pattern]
    found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not found:
        close = difflib.get_close_matches(pattern, list(names), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see model.hook_names"
        raise UnknownHookError(f"no hook point matches {pattern!r}{hint}")
    return found


class HookRegistry:
    """All hook points of one model, in the order the forward pass reaches them."""

    def __init__(self) -> None:
        self.points: dict[str, HookPoint] = {}
        self.positions = torch.zeros(0, dtype=torch.long)
        self.input_ids = torch.zeros(0, 0, dtype=torch.long)

    def point(self, name: str) -> HookPoint:
        """Declare a hook point; names are unique within a model."""
        if name in self.points:
            raise ValueError(f"hook point {name!r} declared twice")
        hp = self.points[name] = HookPoint(name, self)
        return hp

    def sort(self) -> None:
        """Put the points in forward order (modules declare them in construction order)."""
        self.points = dict(sorted(self.points.items(), key=lambda kv: _forward_rank(kv[0])))

    def match(self, pattern: str) -> list[str]:
        """Names matching an exact name or a glob; a pattern matching nothing is an error."""
        return match(pattern, self.points)

    @contextlib.contextmanager
    def attached(self, hooks: Mapping[str, HookFn] | Iterable[tuple[str, HookFn]]) -> Iterator[None]:
        """Register hooks (names or globs) for the duration of the block; always removed on exit."""
        pairs = list(hooks.items()) if isinstance(hooks, Mapping) else list(hooks)
        added: list[tuple[HookPoint, HookFn]] = []
        try:
            for pattern, fn in pairs:
                if not callable(fn):
                    raise TypeError(f"hook for {pattern!r} is not callable")
                for name in self.match(pattern):
                    self.points[name].fns.append(fn)
                    added.append((self.points[name], fn))
            yield
        finally:
            for hp, fn in reversed(added):
                hp.fns.remove(fn)
