"""Routing math shared by the MoE block (`workbench.models.moe`) and its fused kernel (`workbench.kernels.route`):
router logits -> scores -> top-k expert ids -> routing weights (docs/references.md, "Routing, per family")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RouterSpec:
    """How a family turns router logits into expert ids and weights (docs/references.md, "Routing, per family").

    score: "softmax" | "sigmoid" | "sqrtsoftplus" | "identity" (GPT-OSS selects on raw logits).
    group_score: how a group is ranked for group-limited routing: "top2sum" (V3) or "max" (V2).
    weight_softmax: softmax over the k selected values (GPT-OSS) instead of gathering scores.
    """

    experts: int
    top_k: int
    score: str = "softmax"
    correction_bias: bool = False
    groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2sum"
    renormalize: bool = False
    norm_eps: float = 0.0
    scaling: float = 1.0
    weight_softmax: bool = False
    logit_bias: bool = False


def router_scores(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The score function of RouterSpec.score over router logits."""
    if kind == "softmax":
        return logits.softmax(dim=-1)
    if kind == "sigmoid":
        return logits.sigmoid()
    if kind == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    return logits


def selection_scores(scores: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None) -> torch.Tensor:
    """The scores [N, E] that decide selection, from fp32 scores [N, E]: plus the correction bias (which steers
    selection only), experts of groups dropped by group-limited routing set to -inf."""
    sel = scores + correction_bias.float() if correction_bias is not None else scores
    if spec.groups > 1 and spec.topk_groups < spec.groups:
        grouped = sel.view(sel.shape[0], spec.groups, -1)
        if spec.group_score == "top2sum":
            rank = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            rank = grouped.max(dim=-1).values
        keep = torch.sort(rank, dim=-1, descending=True, stable=True).indices[:, : spec.topk_groups]
        mask = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, keep, True)
        sel = grouped.masked_fill(~mask[..., None], float("-inf")).view_as(sel)
    return sel


def select_experts(scores: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None) -> torch.Tensor:
    """Top-k expert ids [N, k] from fp32 scores [N, E] by `selection_scores`; ties go to the lower index."""
    sel = selection_scores(scores, spec, correction_bias)
    return torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, : spec.top_k]


def selection_margin(scores: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None) -> torch.Tensor:
    """Per row of fp32 scores [N, E], the k-th minus the (k+1)-th `selection_scores` value [N]: how far the
    last selected expert stands above the first one left out (0: a tie; inf: nothing left out to take its
    place, e.g. k = E, or every other expert's group dropped). A change of selection between two runs of the
    same token needs a perturbation of the scores at least this large (or a change of the kept groups)."""
    sel = selection_scores(scores, spec, correction_bias)
    k = spec.top_k
    if sel.shape[-1] <= k:
        return sel.new_full(sel.shape[:-1], float("inf"))
    top = sel.topk(k + 1, dim=-1).values
    return torch.where(torch.isinf(top[:, k]), float("inf"), top[:, k - 1] - top[:, k])


def weigh_experts(scores: torch.Tensor, ids: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Weights [N, k] that multiply the outputs of experts `ids`, from the unbiased scores."""
    w = scores.gather(1, ids)
    if spec.weight_softmax:
        w = w.softmax(dim=-1)
    elif spec.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + spec.norm_eps)
    return w * spec.scaling
