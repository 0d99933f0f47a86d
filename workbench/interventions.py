"""Interventions on routing and activations, as hook lists for `model.hooks(...)`.

Each function returns a list of (hook name, fn) pairs, so interventions compose by addition:

    with model.hooks(ablate(3, [5]) + force(4, [0, 1], tokens=range(10, 20)) + steer("layers.2.resid_post", v)):
        logits = model(ids)

`tokens` selects absolute positions (a range, slice, list or bool/int tensor); None means all tokens. Python's
negative indexing does not apply (a position is never negative), so negative positions are refused. Expert
ids are checked against the layer when the hooks fire: an id the layer does not have raises HookError.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import HookError
from .hooks import HookContext, HookFn
from .schema import hook_kind

Hooks = list[tuple[str, HookFn]]
RESIDUAL = ("resid_pre", "resid_mid", "resid_post")  # the hook kinds holding the residual stream
Tokens = range | slice | Sequence[int] | torch.Tensor | None


def _tokens(tokens: Tokens, fn: str) -> slice | torch.Tensor | None:
    """`tokens` checked once: a slice with bounds >= 0 and a positive step, or a 1-D bool mask / position tensor."""
    if tokens is None:
        return None
    if isinstance(tokens, range) and tokens.step > 0:
        tokens = slice(tokens.start, tokens.stop, tokens.step)
    if isinstance(tokens, slice):
        negative = any(b is not None and b < 0 for b in (tokens.start, tokens.stop))
        if negative or (tokens.step is not None and tokens.step <= 0):
            raise ValueError(f"{fn}: tokens={tokens} must have bounds >= 0 and a positive step (absolute positions)")
        return tokens
    t = torch.as_tensor(list(tokens) if isinstance(tokens, range) else tokens)
    t = t.long() if t.numel() == 0 else t  # [] (no position) makes a float tensor
    t = t.reshape(-1) if t.dim() == 0 else t  # a single position
    if t.dim() != 1 or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{fn}: tokens must be positions or a bool mask over positions, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    if t.dtype != torch.bool and t.numel() and int(t.min()) < 0:
        raise ValueError(f"{fn}: token position {int(t.min())} is negative; positions are absolute (0 is the first)")
    return t


def _token_mask(tokens: slice | torch.Tensor | None, ctx: HookContext) -> torch.Tensor:
    """Bool mask [T] over the current forward's positions."""
    pos = ctx.positions
    if tokens is None:
        return torch.ones_like(pos, dtype=torch.bool)
    if isinstance(tokens, slice):
        start, stop = tokens.start or 0, tokens.stop if tokens.stop is not None else int(pos.max()) + 1
        return (pos >= start) & (pos < stop) & ((pos - start) % (tokens.step or 1) == 0)
    wanted = tokens.to(pos.device)
    if wanted.dtype == torch.bool:
        if len(wanted) <= int(pos.max()):
            raise HookError(f"hook on {ctx.name!r}: the tokens mask covers {len(wanted)} positions, this forward "
                            f"reaches position {int(pos.max())}")
        return wanted[pos]
    return torch.isin(pos, wanted)


def _cells(tokens: slice | torch.Tensor | None, experts: list[int] | None, x: torch.Tensor,
           ctx: HookContext) -> torch.Tensor:
    """Bool mask [1, T, E] of the selected tokens' entries for `experts` (all if None) in x [B, T, E]."""
    cols = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
    if experts is not None:
        cols = torch.zeros_like(cols).index_fill_(0, torch.tensor(experts, dtype=torch.long, device=x.device), True)
    return _token_mask(tokens, ctx)[None, :, None] & cols


def _layers(layers: int | Iterable[int]) -> list[int]:
    return [layers] if isinstance(layers, int) else list(layers)


def _experts(experts: Iterable[int], fn: str) -> list[int]:
    ids = [int(e) for e in experts]
    if any(e < 0 for e in ids):
        raise ValueError(f"{fn}: expert ids must be >= 0, got {ids}")
    return ids


def _check_range(fn: str, top: int, layers: list[int]) -> Hooks:
    """Hooks on `router.logits` (whose last axis is the layer's expert count) refusing an expert id >= it."""

    def check(logits: torch.Tensor, ctx: HookContext) -> None:
        if top >= logits.shape[-1]:
            raise HookError(f"{fn} at layer {ctx.layer}: expert {top} does not exist; this layer has "
                            f"{logits.shape[-1]} experts (ids 0 to {logits.shape[-1] - 1})")

    return [(f"layers.{i}.router.logits", check) for i in layers] if top >= 0 else []


def ablate(layers: int | Iterable[int], experts: Iterable[int], tokens: Tokens = None, *,
           mode: str = "zero") -> Hooks:
    """Remove experts at the given layers.

    mode="zero": the experts still count as selected but their weight is set to 0: their output is dropped and
    the other experts' weights stay unchanged (not renormalised, also where the family softmaxes the selected
    logits, as GPT-OSS does). Works on every MoE layer, hash-routed ones included.
    mode="reroute": their router scores are set to -inf, so the router picks the next-best experts instead, weighed
    by the family's rule from the others' unchanged scores (softmax probabilities are not re-normalised over
    the remaining experts unless the family renormalises its top k). Raises HookError on a hash-routed layer
    (DeepSeek-V4's first layers pick experts from the token id, not from scores, so no score can change the
    choice) and where fewer than k experts would remain.
    """
    if mode not in ("zero", "reroute"):
        raise ValueError(f"mode must be 'zero' or 'reroute', got {mode!r}")
    experts, tokens, layers = _experts(experts, "ablate"), _tokens(tokens, "ablate"), _layers(layers)
    checks = _check_range("ablate", max(experts, default=-1), layers)

    def hit(ids: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        gone = torch.isin(ids, torch.tensor(experts, dtype=torch.long, device=ids.device))
        return gone & _token_mask(tokens, ctx)[None, :, None]

    if mode == "zero":
        def zero(w: torch.Tensor, ctx: HookContext) -> torch.Tensor:
            return w.masked_fill(hit(ctx.extra["topk_ids"], ctx), 0.0)

        return checks + [(f"layers.{i}.router.topk_weights", zero) for i in layers]

    counts: dict[int | None, int] = {}  # each layer's expert count, recorded by mask_scores

    def mask_scores(s: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        counts[ctx.layer] = s.shape[-1]
        return s.masked_fill(_cells(tokens, experts, s, ctx), float("-inf"))

    def unselected(ids: torch.Tensor, ctx: HookContext) -> None:
        kept = hit(ids, ctx)
        if not kept.any():
            return
        n, k, gone = counts.get(ctx.layer, 0), ids.shape[-1], len(set(experts))
        if n - gone < k:
            raise HookError(f"ablate(mode='reroute') at layer {ctx.layer}: removing {gone} of its {n} experts leaves "
                            f"{n - gone}, fewer than the k={k} the router picks; ablate fewer or use mode='zero'")
        still = sorted(set(ids[kept].tolist()))
        raise HookError(
            f"ablate(mode='reroute') at layer {ctx.layer}: expert(s) {still} still selected for "
            f"{int(kept.any(-1).sum())} token(s) although their router scores are -inf. This layer does not choose "
            "experts by score (a hash-routed layer takes them from the token id), so rerouting cannot change the "
            "choice (their weight would be 0/0). Use mode='zero' to drop their output, or force() to pick others.")

    return checks + [(f"layers.{i}.router.{p}", fn) for i in layers
                     for p, fn in (("scores", mask_scores), ("topk_ids", unselected))]


def force(layers: int | Iterable[int], experts: Sequence[int] | torch.Tensor, tokens: Tokens = None) -> Hooks:
    """Route tokens to the given experts: a list of k distinct ids for every token, or a tensor [T, k] / [B, T, k]
    whose rows are absolute positions (as `tokens`).

    The router then weighs the forced experts by its own rule from its learned scores (e.g. renormalised softmax
    scores). Hash-routed layers too: only their choice comes from the token id, their weights from the scores.
    """
    forced = torch.as_tensor(experts, dtype=torch.long)
    tokens, layers = _tokens(tokens, "force"), _layers(layers)
    if forced.dim() not in (1, 2, 3) or forced.numel() == 0:
        raise ValueError(f"force: experts must be k ids, [T, k] or [B, T, k], got shape {tuple(forced.shape)}")
    if int(forced.min()) < 0:
        raise ValueError(f"force: expert ids must be >= 0, got {int(forced.min())}")
    ordered = forced.sort(-1).values
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise ValueError("force: an expert repeats within a token's ids; a router picks k distinct experts")

    def fn(ids: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if forced.shape[-1] != ids.shape[-1]:
            raise ValueError(f"force: {forced.shape[-1]} experts given but the router selects k={ids.shape[-1]}")
        want, pos = forced.to(ids.device), ctx.positions
        if forced.dim() > 1:
            if want.shape[-2] <= int(pos.max()) or (want.dim() == 3 and want.shape[0] != ids.shape[0]):
                raise HookError(f"force at layer {ctx.layer}: experts of shape {tuple(want.shape)} do not cover this "
                                f"forward (batch {ids.shape[0]}, positions up to {int(pos.max())})")
            want = want[..., pos, :]
        sel = _token_mask(tokens, ctx)
        new = ids.clone()
        new[:, sel] = want.expand_as(ids)[:, sel]
        return new

    return _check_range("force", int(forced.max()), layers) + [(f"layers.{i}.router.topk_ids", fn) for i in layers]


def scale_router_logits(layers: int | Iterable[int], factor: float, experts: Iterable[int] | None = None,
                        tokens: Tokens = None) -> Hooks:
    """Multiply router logits (all experts, or the listed ones) by `factor`: temperature or expert boosting.

    On a hash-routed layer only the weights of the experts its token ids pick change, never the choice.
    """
    if not math.isfinite(factor):
        raise ValueError(f"scale_router_logits: factor must be finite, got {factor}")
    experts = None if experts is None else _experts(experts, "scale_router_logits")
    tokens, layers = _tokens(tokens, "scale_router_logits"), _layers(layers)

    def fn(logits: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        return torch.where(_cells(tokens, experts, logits, ctx), logits * factor, logits)

    return _check_range("scale_router_logits", max(experts or [], default=-1), layers) + \
        [(f"layers.{i}.router.logits", fn) for i in layers]


def patch(name: str, source: torch.Tensor, tokens: Tokens = None) -> Hooks:
    """Replace hook `name`'s tensor with `source` (e.g. `cache[name]` from another run) at the selected tokens;
    `name` is one exact hook name (a glob would write the same tensor into several points).

    Axis 1 of `source` [B, S, ...] is absolute positions 0..S-1, so a chunked forward or `generate`'s steps take
    the rows of their own positions; a selected position past S-1 raises HookError (select the positions the
    source covers, e.g. tokens=range(S) to patch only a prompt while generating).
    """
    tokens = _tokens(tokens, "patch")

    def fn(x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if ctx.name != name:
            raise HookError(f"patch: {name!r} is a pattern (it matched {ctx.name!r}); patch one hook name at a time")
        if source.dim() != x.dim() or source.shape[0] != x.shape[0] or source.shape[2:] != x.shape[2:]:
            raise ValueError(f"patch: source for {name!r} has shape {tuple(source.shape)}, the run has "
                             f"{tuple(x.shape)} (axis 1: positions)")
        sel = _token_mask(tokens, ctx)
        pos = ctx.positions[sel]
        if pos.numel() and int(pos.max()) >= source.shape[1]:
            raise HookError(f"patch on {name!r}: the source covers positions 0 to {source.shape[1] - 1}, this "
                            f"forward patches position {int(pos.max())}; select only covered positions (tokens=)")
        out = x.clone()
        out[:, sel] = source[:, pos.to(source.device)].to(device=x.device, dtype=x.dtype)
        return out

    return [(name, fn)]


def boost(layers: int | Iterable[int], experts: Iterable[int], bias: float, tokens: Tokens = None) -> Hooks:
    """Add `bias` to the listed experts' router logits: every family's score rises with its logit, so a positive
    bias makes them likelier to be chosen and weighs them more (a softmax router: their probabilities times
    e**bias before normalising); a negative one suppresses them softly. Unlike `scale_router_logits`, the push
    does not depend on the logit's sign. On a hash-routed layer only the weights change, never the choice.
    """
    if not math.isfinite(bias):
        raise ValueError(f"boost: bias must be finite, got {bias}")
    experts, tokens, layers = _experts(experts, "boost"), _tokens(tokens, "boost"), _layers(layers)

    def fn(logits: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        return torch.where(_cells(tokens, experts, logits, ctx), logits + bias, logits)

    return _check_range("boost", max(experts, default=-1), layers) + [(f"layers.{i}.router.logits", fn) for i in layers]


def steer(name: str, vector: Any, scale: float = 1.0, tokens: Tokens = None) -> Hooks:
    """Add `scale * vector` to the residual stream at hook `name` (`layers.{i}.resid_pre` / `resid_mid` /
    `resid_post`, or a glob of them) at the selected tokens. `vector` (a tensor or array) is [hidden], or under
    DeepSeek-V4's hyper-connections [hidden] for every stream alike or [hc_mult, hidden] one per stream."""
    if not math.isfinite(scale):
        raise ValueError(f"steer: scale must be finite, got {scale}")
    v = vector if isinstance(vector, torch.Tensor) else torch.as_tensor(np.asarray(vector))
    if v.dim() == 0 or not v.is_floating_point() or not torch.isfinite(v).all():
        raise ValueError(f"steer: vector must be a finite float vector, got {v.dtype} of shape {tuple(v.shape)}")
    tokens, delta = _tokens(tokens, "steer"), scale * v.float()

    def fn(x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if hook_kind(ctx.name) not in RESIDUAL:
            raise HookError(f"steer: {ctx.name!r} is not a residual-stream hook point; steer one of "
                            f"layers.{{i}}.{{{','.join(RESIDUAL)}}}")
        if delta.dim() > x.dim() - 2 or delta.shape != x.shape[x.dim() - delta.dim():]:
            raise HookError(f"steer: a vector of shape {tuple(delta.shape)} does not fit {ctx.name!r}, whose "
                            f"per-token shape is {tuple(x.shape[2:])}")
        sel = _token_mask(tokens, ctx).view(1, -1, *[1] * (x.dim() - 2))
        return torch.where(sel, x + delta.to(device=x.device, dtype=x.dtype), x)

    return [(name, fn)]


def replay(trace: object, tokens: Tokens = None) -> Hooks:
    """Route as `trace` records: at each of its routed layers every selected token gets its recorded ids, weighed
    by the router's own rule as in `force`. `trace` is a routing Dataset of positions 0..T-1 (`open_store`,
    `analysis.from_cache`, `workbench.engines`) or a dict {layer number: ids [T, k]}."""
    if isinstance(trace, dict):
        recorded = {int(layer): ids for layer, ids in trace.items()}
    elif hasattr(trace, "topk_ids") and "layer" in trace.topk_ids.dims:
        ids = trace.topk_ids.transpose("layer", "token", "k")
        positions = ids.token.values.tolist()
        if positions != list(range(len(positions))):
            raise ValueError(f"replay: the trace covers positions {positions[0]}..{positions[-1]}, not 0..T-1; "
                             "replay a trace of a whole sequence")
        routed = set(trace.attrs.get("routed_layers", ids.layer.values.tolist()))
        recorded = {int(layer): ids.sel(layer=layer).values for layer in ids.layer.values if int(layer) in routed}
    else:
        raise TypeError(f"replay: trace must be a routing Dataset or {{layer: ids [T, k]}}, got {type(trace).__name__}")
    if not recorded:
        raise ValueError("replay: the trace holds no routed layer")
    return [hook for layer, ids in recorded.items()
            for hook in force(layer, torch.as_tensor(ids).long(), tokens)]
