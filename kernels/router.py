"""Fused router: score function, biased group-limited top-k and the routing weights in one pass.

Semantics are those of `workbench.routing.select_experts` + `weigh_experts`, as `workbench.models.moe.Router`
routes (docs/references.md, "Routing, per family"): the correction bias only steers selection, dropped groups
are masked with -inf, ties go to the lower index, and the weights come from the unbiased scores.
"""

from __future__ import annotations

import torch

from workbench.routing import RouterSpec, router_scores, select_experts, weigh_experts

from .backend import cdiv, next_pow2, require, use_triton

SCORES = ("softmax", "sigmoid", "sqrtsoftplus", "identity")


def _groups_limited(spec: RouterSpec) -> bool:
    """Whether selection is limited to the best `topk_groups` of `groups` groups (as in Router.select)."""
    return spec.groups > 1 and spec.topk_groups < spec.groups


def reference_route(logits: torch.Tensor, spec: RouterSpec,
                    correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [N, k] (int64) and weights [N, k] (fp32) of logits [N, E], computed as models.moe.Router does."""
    scores = router_scores(logits.float(), spec.score)
    ids = select_experts(scores, spec, correction_bias)
    return ids, weigh_experts(scores, ids, spec)


def triton_route(logits: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None = None, *,
                 ids_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel behind `route`: one program scores, selects and weighs a few rows."""
    require("route_kernel", logits)
    n, experts = logits.shape
    limited = _groups_limited(spec)
    if (experts != spec.experts or spec.score not in SCORES or spec.top_k > experts
            or (limited and experts % spec.groups)):
        raise ValueError(f"router logits [{n}, {experts}] do not fit {spec}")
    ids = torch.empty(n, spec.top_k, dtype=ids_dtype, device=logits.device)
    weights = torch.empty(n, spec.top_k, dtype=torch.float32, device=logits.device)
    if n == 0:
        return ids, weights
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    block_e = next_pow2(experts)
    block_t = min(16, max(1, 2048 // block_e))
    from .router_jit import route_kernel

    route_kernel[(cdiv(n, block_t),)](
        logits, logits if correction_bias is None else correction_bias, ids, weights, n, logits.stride(0),
        spec.norm_eps, spec.scaling,
        E=experts, K=spec.top_k, SCORE=SCORES.index(spec.score), HAS_BIAS=correction_bias is not None,
        GROUPS=spec.groups if limited else 1, KEEP_GROUPS=spec.topk_groups if limited else 1,
        GROUP_TOP2=spec.group_score == "top2sum", WEIGHT_SOFTMAX=spec.weight_softmax, RENORM=spec.renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_pow2(spec.top_k),
        BLOCK_G=next_pow2(spec.groups if limited else 1), num_warps=4,
    )
    return ids, weights


def route(logits: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None = None, *,
          ids_dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids [N, k], topk_weights [N, k] fp32) of router logits [N, E]: the kernel where it runs."""
    if use_triton(logits):
        return triton_route(logits, spec, correction_bias, ids_dtype=ids_dtype)
    ids, weights = reference_route(logits, spec, correction_bias)
    return ids.to(ids_dtype), weights
