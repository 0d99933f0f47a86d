"""Reading a prediction back into the model's parts: direct logit attribution and the logit lens, labelled as xarray.

Direct logit attribution: the residual entering the final norm is the sum of the embedding and every block's output
(attention, dense MLP, shared expert, each routed expert slot's weighted output). With the norm's scale frozen at
its value in the forward (1 / rms of the actual residual), the logit of token t is linear in that residual, so
each part's share is (part / rms) . (norm weight * unembedding row t), and the shares add up to the logit.
Under DeepSeek-V4's hyper-connections the residual is `hc_mult` streams: with the forward's own mixings fixed
(the `hc.*.post` / `hc.*.comb` and `final.hc_pre` hooks) every later spread, Sinkhorn mixing and the head's
collapse are linear, and each block's output reaches the final residual times one scalar per token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import xarray as xr

from .errors import InputError
from .hooks import HookContext
from .models.base import CausalLM
from .models.layers import dense_weight

NO_LAYER = -1  # `layer`, `expert` and `slot` of a component without one (the embedding; all but routed slots)
Part = tuple[tuple[int, str, int, int], torch.Tensor]  # ((layer, kind, expert, slot), share of the logit)


class _Recorder:
    """Hook function keeping, from one forward over one sequence, each hook's tensor at the tokens `at` (fp32, the
    batch axis dropped) and the expert ids beside per-expert tensors; checks the batch and position first."""

    def __init__(self, at: int | slice):
        self.at, self.kept, self.ids = at, {}, {}
        self.positions = torch.zeros(0, dtype=torch.long)
        self.input_ids = torch.zeros(0, dtype=torch.long)

    def __call__(self, x: torch.Tensor, ctx: HookContext) -> None:
        if ctx.input_ids.shape[0] != 1:
            raise InputError(f"one sequence at a time: input_ids has a batch of {ctx.input_ids.shape[0]}")
        T = len(ctx.positions)
        if isinstance(self.at, int) and not -T <= self.at < T:
            raise InputError(f"position {self.at} is outside the sequence of {T} tokens")
        self.positions, self.input_ids = ctx.positions, ctx.input_ids[0]
        self.kept[ctx.name] = x[0, self.at].detach().float()
        if "topk_ids" in ctx.extra:
            self.ids[ctx.name] = ctx.extra["topk_ids"][0, self.at]

    def run(self, model: CausalLM, ids: Any, names: Iterable[str], head: bool) -> torch.Tensor | None:
        with torch.no_grad(), model.hooks([(n, self) for n in names]):
            return model(ids, head=head)


def _streams(model: CausalLM) -> bool:
    """True where the residual is DeepSeek-V4's hyper-connection streams [B, T, n, H], collapsed by the head."""
    return "final.hc_pre" in model.hook_names


def direct_logit_attribution(model: CausalLM, ids: Any, target: int, *, position: int = -1) -> xr.DataArray:
    """Each part's direct contribution to the logit of token `target` at `position` of one sequence `ids`, in fp32:
    the embedding, each layer's attention, dense MLP, shared expert and routed expert slots (the slot's routing
    weight times its expert's output), with the final norm's scale frozen as in the forward.

    Dims (component,), labelled by `layer`, `kind` (embed / attn / mlp / shared / expert), `expert` and `slot`
    (-1 where none); attrs: `logit` (the forward's own), `target`, `position` with its `token_id`, and `rms` of the
    final residual. The contributions sum to `logit` up to rounding (no head has a bias to add); see the module
    docstring.
    """
    if not 0 <= int(target) < model.vocab_size:
        raise InputError(f"target token {target} is outside the vocabulary [0, {model.vocab_size})")
    layers, names, streams = list(model.layers), set(model.hook_names), _streams(model)
    want = [f"layers.{layers[0]}.resid_pre", f"layers.{layers[-1]}.resid_post"]
    for i in layers:
        p = f"layers.{i}."
        want += [p + "attn.out", p + "mlp.out", p + "experts.out", p + "router.topk_weights", p + "shared.out"]
        want += [f"{p}hc.{b}.{m}" for b in ("attn", "ffn") for m in ("post", "comb")]
    rec = _Recorder(position)
    logits = rec.run(model, ids, [n for n in want if n in names] + (["final.hc_pre"] if streams else []), head=True)
    got = rec.kept

    resid = got[f"layers.{layers[-1]}.resid_post"]  # what the final norm reads, V4: after the head's collapse
    gain = torch.ones(())  # V4: the streams' weights in the final residual, walked back below block by block
    if streams:
        gain = got["final.hc_pre"]
        resid = (gain[:, None] * resid).sum(0)
    rms = torch.sqrt(resid.square().mean() + model.norm.eps)
    row = dense_weight(model.lm_head, torch.float32)[int(target)].float() * model.norm.weight.float()
    direction = row / rms

    blocks: list[list[Part]] = []  # each block's parts, walked from the last block back to the embedding
    for i in reversed(layers):
        for block in ("ffn", "attn"):
            carry = torch.ones(())
            if streams:  # new streams = post * out + comb^T @ old: the block's scalar, then the weights before it
                post, comb = got[f"layers.{i}.hc.{block}.post"], got[f"layers.{i}.hc.{block}.comb"]
                carry, gain = gain @ post, comb @ gain
            blocks.append(_block_parts(got, rec.ids, int(i), block, carry * direction))
    embed = got[f"layers.{layers[0]}.resid_pre"]  # V4: the embedding copied into every stream
    blocks.append([((NO_LAYER, "embed", NO_LAYER, NO_LAYER),
                    gain.sum() * (embed[0] @ direction) if streams else embed @ direction)])
    parts = [part for block in reversed(blocks) for part in block]  # forward order

    labels = [label for label, _ in parts]
    coords = {"component": [_component_name(*label) for label in labels]}
    coords |= {dim: ("component", np.array(values)) for dim, values in zip(("layer", "kind", "expert", "slot"),
                                                                             zip(*labels))}
    return xr.DataArray(
        torch.stack([share for _, share in parts]).cpu().numpy(), dims=("component",), name="logit_contribution",
        coords=coords, attrs={"logit": float(logits[0, position, int(target)]), "target": int(target),
                              "position": int(rec.positions[position]), "token_id": int(rec.input_ids[position]),
                              "rms": float(rms)})


def _block_parts(got: dict[str, torch.Tensor], ids: dict[str, torch.Tensor], layer: int, block: str,
                 direction: torch.Tensor) -> list[Part]:
    """One block's parts (attention; dense MLP; routed slots then shared expert) and their shares of the logit, in
    forward order; `direction` is the logit's direction in the final residual times the block's scalar."""
    p = f"layers.{layer}."
    if block == "attn" or p + "mlp.out" in got:
        kind = "attn" if block == "attn" else "mlp"
        return [((layer, kind, NO_LAYER, NO_LAYER), got[p + f"{kind}.out"] @ direction)]
    weights = p + "router.topk_weights"
    shares = got[weights] * (got[p + "experts.out"] @ direction)
    parts = [((layer, "expert", e, j), s) for j, (e, s) in enumerate(zip(ids[weights].tolist(), shares))]
    if p + "shared.out" in got:
        parts.append(((layer, "shared", NO_LAYER, NO_LAYER), got[p + "shared.out"] @ direction))
    return parts


def _component_name(layer: int, kind: str, expert: int, slot: int) -> str:
    """`embed`, `layers.3.attn`, `layers.3.shared`, `layers.3.expert.17` (expert 17, in whichever slot)."""
    if layer == NO_LAYER:
        return kind
    return f"layers.{layer}.{kind}" + (f".{expert}" if kind == "expert" else "")


def logit_lens(model: CausalLM, ids: Any, *, layers: Iterable[int] | None = None, top: int = 5) -> xr.Dataset:
    """The model's own head (final norm and unembedding; V4: the head's stream collapse first, computed on those
    streams) applied to the residual after each layer of one sequence: the `top` tokens and their probabilities.

    Variables `top_ids(layer, token, rank)` and `top_probs(layer, token, rank)` (fp32), `input_ids(token)`; `layer`
    holds the checkpoint's numbers, `token` absolute positions. At the last layer this is the model's prediction.
    """
    if top < 1:
        raise ValueError(f"logit_lens: top must be >= 1, got {top}")
    every = [int(i) for i in model.layers]
    chosen = every if layers is None else [int(i) for i in layers]
    if missing := sorted(set(chosen) - set(every)):
        raise ValueError(f"logit_lens: the model has no layer {missing}; its layers are {every}")
    rec = _Recorder(slice(None))
    rec.run(model, ids, [f"layers.{i}.resid_post" for i in chosen], head=False)
    top_ids, top_probs = [], []
    with torch.no_grad():
        for i in chosen:
            x = rec.kept[f"layers.{i}.resid_post"].to(model.embed.weight.dtype)  # the residual's own dtype
            if _streams(model):
                x = model.hc_head(x[None])[0]
            probs = model.lm_head(model.norm(x)).float().softmax(-1)
            p, j = probs.topk(min(top, probs.shape[-1]), dim=-1)
            top_ids.append(j)
            top_probs.append(p)
    dims = ("layer", "token", "rank")
    return xr.Dataset(
        {"top_ids": (dims, torch.stack(top_ids).cpu().numpy()),
         "top_probs": (dims, torch.stack(top_probs).cpu().numpy()),
         "input_ids": (("token",), rec.input_ids.cpu().numpy())},
        coords={"layer": chosen, "token": rec.positions.cpu().numpy(), "rank": np.arange(len(top_ids[0][0]))},
        attrs={"lens": "final norm and unembedding of the model's own head on each layer's resid_post"})
