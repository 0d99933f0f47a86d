"""Interventions on routing and activations, as hook lists for `model.hooks(...)`.

Each function returns a list of (hook name, fn) pairs, so interventions compose by addition:

    with model.hooks(ablate(3, [5]) + force(4, [0, 1], tokens=range(10, 20))):
        logits = model(ids)

`tokens` selects absolute positions (a range, slice, list or bool/int tensor); None means all tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .hooks import HookContext, HookFn

Hooks = list[tuple[str, HookFn]]
Tokens = range | slice | Sequence[int] | torch.Tensor | None


def _token_mask(tokens: Tokens, ctx: HookContext) -> torch.Tensor:
    """Bool mask [T] over the current forward's positions."""
    pos = ctx.positions
    if tokens is None:
        return torch.ones_like(pos, dtype=torch.bool)
    if isinstance(tokens, slice):
        start, stop = tokens.start or 0, tokens.stop if tokens.stop is not None else int(pos.max()) + 1
        return (pos >= start) & (pos < stop) & ((pos - start) % (tokens.step or 1) == 0)
    wanted = torch.as_tensor(list(tokens) if isinstance(tokens, range) else tokens, device=pos.device)
    if wanted.dtype == torch.bool:
        return wanted[pos]
    return torch.isin(pos, wanted)


def _layers(layers: int | Iterable[int]) -> list[int]:
    return [layers] if isinstance(layers, int) else list(layers)


def ablate(layers: int | Iterable[int], experts: Iterable[int], tokens: Tokens = None, *,
           mode: str = "zero") -> Hooks:
    """Remove experts at the given layers.

    mode="zero": the experts still count as selected but their weight is set to 0 (their output is
    dropped, the other experts' weights unchanged). mode="reroute": their router scores are set to
    -inf so the router picks the next-best experts instead (weights follow the family's rule).
    """
    experts = list(experts)
    if mode not in ("zero", "reroute"):
        raise ValueError(f"mode must be 'zero' or 'reroute', got {mode!r}")

    if mode == "zero":
        def zero(w: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            ids = ctx.extra["topk_ids"]
            hit = torch.isin(ids, torch.tensor(experts, device=ids.device)) & _token_mask(tokens, ctx)[None, :, None]
            return w.masked_fill(hit, 0.0)

        return [(f"layers.{i}.router.topk_weights", zero) for i in _layers(layers)]

    def mask_scores(s: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        s = s.clone()
        sel = _token_mask(tokens, ctx)
        s[:, sel, experts] = float("-inf")
        return s

    return [(f"layers.{i}.router.scores", mask_scores) for i in _layers(layers)]


def force(layers: int | Iterable[int], experts: Sequence[int] | torch.Tensor, tokens: Tokens = None) -> Hooks:
    """Route tokens to the given experts: a list of k ids for every token, or a tensor [T, k] / [B, T, k].

    The router then weighs the forced experts by its own rule (e.g. renormalised softmax scores).
    """
    forced = torch.as_tensor(experts, dtype=torch.long)

    def fn(ids: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if forced.dim() == 1 and forced.numel() != ids.shape[-1]:
            raise ValueError(f"force: {forced.numel()} experts given but the router selects k={ids.shape[-1]}")
        sel = _token_mask(tokens, ctx)
        new = ids.clone()
        new[:, sel] = forced.to(ids.device).expand_as(ids)[:, sel]
        return new

    return [(f"layers.{i}.router.topk_ids", fn) for i in _layers(layers)]


def scale_router_logits(layers: int | Iterable[int], factor: float, experts: Iterable[int] | None = None,
                        tokens: Tokens = None) -> Hooks:
    """Multiply router logits (all experts, or the listed ones) by `factor`: temperature or expert boosting."""
    experts = None if experts is None else list(experts)

    def fn(logits: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        out = logits.clone()
        sel = _token_mask(tokens, ctx)
        cols = slice(None) if experts is None else experts
        out[:, sel, cols] = out[:, sel, cols] * factor
        return out

    return [(f"layers.{i}.router.logits", fn) for i in _layers(layers)]


def patch(name: str, source: torch.Tensor, tokens: Tokens = None) -> Hooks:
    """Replace hook `name`'s tensor with `source` (e.g. `cache[name]` from another run) at the selected tokens."""

    def fn(x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if source.shape != x.shape:
            raise ValueError(f"patch: source for {name!r} has shape {tuple(source.shape)}, the run has {tuple(x.shape)}")
        sel = _token_mask(tokens, ctx)
        out = x.clone()
        out[:, sel] = source.to(device=x.device, dtype=x.dtype)[:, sel]
        return out

    return [(name, fn)]
