"""DeepSeek-V4 (V4-Flash, V4-Pro): hyper-connected residual streams, sliding-window attention with pooled
long-range entries (CSA / HCA), hash-routed and sqrtsoftplus-routed MoE (docs/references.md, "Attention").

- Residual: `hc_mult` streams [B, T, n, H]. Before each block a linear map of the RMS-normalised flattened
  streams gives three mixings: `pre` (sigmoid + eps) collapses the streams into the block input, `post`
  (2 sigmoid) spreads the block output back, `comb` (softmax + eps, Sinkhorn-normalised, columns first)
  mixes the streams: new = post * out + comb^T @ streams. `hc_head` collapses them before the final norm.
- Attention: one shared KV head used as both key and value, per-head unweighted RMSNorm on queries,
  interleaved RoPE on the last `qk_rope_head_dim` channels (undone on the output at the query position),
  a learned sink logit per head, every layer attending to the last `sliding_window` raw tokens. HCA layers
  add one pooled entry per `m'` tokens (softmax(gate + ape)-weighted sum, RMSNorm, RoPE at the window
  start); CSA layers pool overlapping windows (width 2m, stride m) and attend only to the `index_topk`
  entries a lightning indexer (with its own pooled keys) scores highest. Output through a grouped
  low-rank projection.
- MoE: sqrtsoftplus scores; learned layers pick the top-k of scores + correction bias, hash layers take
  `tid2eid[token]`; weights are the picked scores renormalised times `routed_scaling_factor`; experts and
  the shared expert use a clamped SwiGLU.

Parameter names follow the official checkpoint (`attn.wq_a`, `attn.compressor.ape`, `hc_attn.fn`...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import CheckpointError
from ..hooks import HookRegistry
from ..parallel import torch_threads
from ..routing import RouterSpec
from .base import CausalLM, ModelArgs, Rule, State
from .indexer import index_topk
from .layers import Linear, RMSNorm, Rotary, activation, dense_weight, remember
from .moe import MoE, Router

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LEGACY_RATIOS = {0: SLIDING, 4: CSA, 128: HCA}  # `compress_ratios` of older configs, per layer


# ---------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class Args(ModelArgs):
    """DeepSeek-V4 fields (HF `deepseek_v4` or the official inference config), read and checked together."""

    # attention
    heads: int
    head_dim: int  # width of each query head and of the one shared key/value head
    q_rank: int  # width of the q latent (q_lora_rank)
    o_groups: int  # head groups, each with its own low-rank output projection
    o_rank: int  # rank of each group's output projection (o_lora_rank)
    window: int  # raw tokens each query attends to, itself included (sliding_window)
    types: tuple[str, ...]  # attention kind per layer: SLIDING, CSA or HCA
    rates: dict[str, int]  # tokens pooled per entry: m (CSA), m' (HCA)
    rope_dim: int  # rotary channels, the last of each head
    ropes: dict[str, dict]  # RoPE parameters of sliding-only layers ("main") and compressed ones ("compress")
    index_heads: int
    index_dim: int  # width of each indexer query head and of the indexer's pooled keys
    index_topk: int  # pooled entries each CSA query attends to
    # hyper-connections
    hc_mult: int  # residual streams
    hc_iters: int  # Sinkhorn iterations normalising `comb`
    hc_eps: float
    # MoE
    hashed: tuple[bool, ...]  # per layer: hash-routed (True) or learned top-k
    router: RouterSpec  # learned layers: top-k of the scores + correction bias
    hash_router: RouterSpec  # hash layers: experts from `tid2eid`, weights from the scores
    inter: int  # width of each routed expert and of the shared one (moe_intermediate_size)
    act: Callable
    limit: float | None  # swiglu_limit: expert gate clamped above, up both sides; None when not positive

    @classmethod
    def from_config(cls, cfg: Config) -> Args:
        base = ModelArgs.common(cfg, eps=1e-6)
        if cfg.int("num_key_value_heads", 1) != 1:
            raise CheckpointError("DeepSeek-V4 attention has one shared KV head (num_key_value_heads must be 1)",
                                  file=cfg.file)
        if cfg.int("n_shared_experts", 1) != 1:
            raise CheckpointError("DeepSeek-V4 has exactly one shared expert (n_shared_experts must be 1)",
                                  file=cfg.file)
        types, rates, hashed = layer_types(cfg), compress_rates(cfg), hash_layers(cfg, base.layers)
        heads, head_dim, groups = cfg.int("num_attention_heads"), cfg.int("head_dim"), cfg.int("o_groups")
        dim, ropes = rope_dim(cfg, head_dim), rope_params(cfg)
        experts, top_k = cfg.int("n_routed_experts"), cfg.int("num_experts_per_tok")
        if top_k > experts:
            raise CheckpointError(f"num_experts_per_tok={top_k} exceeds n_routed_experts={experts}", file=cfg.file)
        cfg.choice("scoring_func", ("sqrtsoftplus",), "sqrtsoftplus")
        routing = dict(score="sqrtsoftplus", renormalize=cfg.get("norm_topk_prob", True), norm_eps=1e-20,
                       scaling=cfg.float("routed_scaling_factor", 1.5))
        limit = cfg.float("swiglu_limit", 10.0)
        if (heads * head_dim) % groups:
            raise CheckpointError(f"o_groups={groups} does not divide {heads} heads x {head_dim}", file=cfg.file)
        index_dim = cfg.int("index_head_dim", 128)
        if CSA in types and index_dim < dim:
            raise CheckpointError(f"index_head_dim={index_dim} is smaller than the {dim} rotary dims", file=cfg.file)
        return cls(
            **vars(base), heads=heads, head_dim=head_dim, q_rank=cfg.int("q_lora_rank"), o_groups=groups,
            o_rank=cfg.int("o_lora_rank"), window=cfg.int("sliding_window"), types=tuple(types), rates=rates,
            rope_dim=dim, ropes=ropes, index_heads=cfg.int("index_n_heads", 64), index_dim=index_dim,
            index_topk=cfg.int("index_topk", 512), hc_mult=cfg.int("hc_mult", 4),
            hc_iters=cfg.int("hc_sinkhorn_iters", 20), hc_eps=cfg.float("hc_eps", 1e-6), hashed=tuple(hashed),
            router=RouterSpec(experts, top_k, correction_bias=True, **routing),
            hash_router=RouterSpec(experts, top_k, **routing), inter=cfg.int("moe_intermediate_size"),
            act=activation(cfg), limit=limit if limit > 0 else None,
        )


def layer_types(cfg: Config) -> list[str]:
    """Attention kind per layer: `layer_types`, legacy `compress_ratios`, or V4-Pro's default schedule."""
    n = cfg.int("num_hidden_layers")
    types, ratios = cfg.get("layer_types"), cfg.get("compress_ratios")
    if types is None and ratios is not None:
        if not isinstance(ratios, list) or any(r not in LEGACY_RATIOS for r in ratios):
            raise CheckpointError(f"compress_ratios must list 0, 4 or 128 per layer, got {ratios!r}", file=cfg.file)
        types = [LEGACY_RATIOS[r] for r in ratios]
    if types is None:
        types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    if not isinstance(types, list) or len(types) < n or any(t not in (SLIDING, CSA, HCA) for t in types[:n]):
        raise CheckpointError(f"layer_types must list {n} of {SLIDING}, {CSA}, {HCA}", file=cfg.file)
    return types[:n]


def compress_rates(cfg: Config) -> dict[str, int]:
    """Tokens pooled per entry for CSA (m) and HCA (m')."""
    rates = {CSA: 4, HCA: 128}
    given = cfg.get("compress_rates") or {}
    if not isinstance(given, dict):
        raise CheckpointError("compress_rates must be an object", file=cfg.file)
    rates.update(given)
    for kind, legacy in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
        if legacy in cfg:
            rates[kind] = cfg.int(legacy)
    for kind, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
            raise CheckpointError(f"compress rate of {kind} must be a positive integer, got {rate!r}", file=cfg.file)
    return rates


def hash_layers(cfg: Config, n: int) -> list[bool]:
    """Per layer of `n`: hash-routed (True) or learned top-k, from `mlp_layer_types` or `num_hash_layers`
    (default 3)."""
    types = cfg.get("mlp_layer_types")
    if types is None:
        k = cfg.int("num_hash_layers", 3, min=0)
        types = ["hash_moe"] * min(n, k) + ["moe"] * max(0, n - k)
    if not isinstance(types, list) or len(types) < n or any(t not in ("hash_moe", "moe") for t in types[:n]):
        raise CheckpointError(f"mlp_layer_types must list {n} of hash_moe, moe", file=cfg.file)
    return [t == "hash_moe" for t in types[:n]]


def rope_dim(cfg: Config, head_dim: int) -> int:
    """Rotary channels per head: head_dim * partial_rotary_factor, else qk_rope_head_dim, else head_dim / 8."""
    if "partial_rotary_factor" in cfg:
        dim = int(head_dim * cfg.float("partial_rotary_factor"))
    else:
        dim = cfg.int("qk_rope_head_dim", head_dim // 8)
    if dim < 2 or dim % 2 or dim > head_dim:
        raise CheckpointError(f"rotary dims {dim} must be even and within head_dim={head_dim}", file=cfg.file)
    return dim


def rope_params(cfg: Config) -> dict[str, dict]:
    """RoPE for sliding-only layers ("main": plain, rope_theta) and compressed ones ("compress":
    compress_rope_theta, YaRN when configured, without YaRN's attention factor)."""
    given = cfg.get("rope_parameters") or {}
    if isinstance(given.get("main"), dict) and isinstance(given.get("compress"), dict):
        return {k: {"rope_type": "default", **given[k]} for k in ("main", "compress")}
    flat = {k: v for k, v in {**given, **(cfg.get("rope_scaling") or {})}.items() if not isinstance(v, dict)}
    flat.setdefault("rope_type", flat.pop("type", "default"))
    main = {"rope_type": "default", "rope_theta": cfg.float("rope_theta", 10000.0)}
    compress = {**flat, "rope_theta": cfg.float("compress_rope_theta", 160000.0)}
    if compress["rope_type"] == "yarn":
        compress.setdefault("attention_factor", 1.0)
        compress.setdefault("original_max_position_embeddings", cfg.int("max_position_embeddings"))
    return {"main": main, "compress": compress}


# ---------------------------------------------------------------- attention


def rope_tail(rotary: Rotary, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last `rotary.dim` channels of x [..., T, D]; the leading ones pass through."""
    nope, rot = x.split([x.shape[-1] - rotary.dim, rotary.dim], dim=-1)
    return torch.cat((nope, rotary.apply(rot, cos, sin)), dim=-1)


def _sub(state: dict | None, key: str) -> dict | None:
    return None if state is None else state.setdefault(key, {})


class Compressor(nn.Module):
    """Pools every `rate` tokens into one entry: softmax over the window of (gate + ape) weighs the projected
    tokens per channel, then RMSNorm and RoPE at the window's first position.

    `overlap` (CSA): tokens project to two series; entry w pools series A of window w-1 with series B of
    window w (width 2 * rate, stride rate). Chunked, the state keeps the tokens of the unfinished window,
    the last window's series A, and the entries so far.
    """

    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, rotary: Rotary, eps: float):
        super().__init__()
        self.dim, self.rate, self.overlap, self.rotary = dim, rate, overlap, rotary
        width = 2 * dim if overlap else dim
        self.wkv = Linear(hidden, width, bias=False)
        self.wgate = Linear(hidden, width, bias=False)
        self.ape = nn.Parameter(torch.empty(rate, width))
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, state: dict | None) -> torch.Tensor:
        """Every entry pooled so far [B, N, dim] (N = completed windows), given this chunk x [B, T, H]."""
        B, r, d = x.shape[0], self.rate, self.dim
        kv, gate = self.wkv(x), self.wgate(x)
        done = 0  # windows pooled by earlier chunks
        if state:
            kv, gate = torch.cat((state["kv"], kv), 1), torch.cat((state["gate"], gate), 1)
            done = state["entries"].shape[1]
        n = kv.shape[1] // r
        kv_w = kv[:, : n * r].view(B, n, r, kv.shape[-1])
        gate_w = gate[:, : n * r].view(B, n, r, kv.shape[-1]) + self.ape
        pool_kv, pool_gate = kv_w, gate_w
        if self.overlap:
            prev_kv = state["prev_kv"] if state and "prev_kv" in state else kv_w.new_zeros(B, 1, r, d)
            prev_gate = (state["prev_gate"] if state and "prev_gate" in state
                         else gate_w.new_full((B, 1, r, d), float("-inf")))
            pool_kv = torch.cat((torch.cat((prev_kv, kv_w[:, :-1, :, :d]), 1)[:, :n], kv_w[..., d:]), dim=2)
            pool_gate = torch.cat((torch.cat((prev_gate, gate_w[:, :-1, :, :d]), 1)[:, :n], gate_w[..., d:]), dim=2)
        entries = self.norm((pool_kv * pool_gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(2))
        cos, sin = self.rotary.cos_sin((done + torch.arange(n, device=x.device)) * r, entries.dtype)
        entries = rope_tail(self.rotary, entries, cos, sin)
        if state is None:
            return entries
        # copies, not views: a view would keep the whole chunk's projections alive until the next chunk
        if n and self.overlap:
            state["prev_kv"], state["prev_gate"] = kv_w[:, -1:, :, :d].clone(), gate_w[:, -1:, :, :d].clone()
        state["kv"], state["gate"] = kv[:, n * r:].clone(), gate[:, n * r:].clone()
        state["entries"] = torch.cat((state["entries"], entries), 1) if "entries" in state else entries
        return state["entries"]


class Indexer(nn.Module):
    """Lightning indexer: the score of entry s for query t is sum_h w_h(t) * ReLU(q_h(t) . k(s)) * D^-0.5,
    with w = weights_proj(x) * H^-0.5, over its own pooled keys (an overlapping compressor)."""

    def __init__(self, args: Args, rotary: Rotary, rate: int):
        super().__init__()
        self.heads, self.dim, self.topk, self.rotary = args.index_heads, args.index_dim, args.index_topk, rotary
        self.wq_b = Linear(args.q_rank, self.heads * self.dim, bias=False)
        self.weights_proj = Linear(args.hidden, self.heads, bias=False)
        self.compressor = Compressor(args.hidden, self.dim, rate, True, rotary, args.eps)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                complete: torch.Tensor, state: dict | None) -> torch.Tensor:
        """Entry indices [B, T, index_topk] each query attends to, best first, -1 padded; query t may pick
        entries [0, complete[t])."""
        B, T, _ = x.shape
        keys = self.compressor(x, state)[:, : int(complete.max())].float()  # later entries are nobody's
        q = rope_tail(self.rotary, self.wq_b(q_latent).view(B, T, self.heads, self.dim), cos[:, None], sin[:, None])
        w = F.linear(x.float(), dense_weight(self.weights_proj, x.dtype).float())
        w = w * (self.heads**-0.5 * self.dim**-0.5)  # [B, T, H]
        return torch.stack([index_topk(q[b].float(), w[b], keys[b].T, complete, self.topk) for b in range(B)])


class V4Attention(nn.Module):
    """V4 attention of one layer kind (sliding, CSA or HCA); names follow the checkpoint's `attn.*`.

    Hook `{prefix}.attn.indexer_topk` (CSA) [B, T, index_topk] int64: the pooled entries each query attends
    to (entry w pools tokens from w * m), best first, -1 padded; a hook may rewrite it (entries that are not
    yet complete for that query are ignored).
    """

    def __init__(self, args: Args, kind: str, rotary: Rotary, rate: int, hooks: HookRegistry, prefix: str):
        super().__init__()
        hidden, q_rank, o_rank = args.hidden, args.q_rank, args.o_rank
        self.heads, self.head_dim, self.groups, self.eps = args.heads, args.head_dim, args.o_groups, args.eps
        self.window, self.rate, self.rotary = args.window, rate, rotary
        self.wq_a = Linear(hidden, q_rank, bias=False)
        self.q_norm = RMSNorm(q_rank, self.eps)
        self.wq_b = Linear(q_rank, self.heads * self.head_dim, bias=False)
        self.wkv = Linear(hidden, self.head_dim, bias=False)
        self.norm = RMSNorm(self.head_dim, self.eps)
        self.wo_a = Linear(self.heads * self.head_dim // self.groups, self.groups * o_rank, bias=False)
        self.wo_b = Linear(self.groups * o_rank, hidden, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(self.heads))
        self.compressor = None if kind == SLIDING else Compressor(hidden, self.head_dim, rate, kind == CSA,
                                                                   rotary, self.eps)
        self.indexer = Indexer(args, rotary, rate) if kind == CSA else None
        self.hp_topk = hooks.point(f"{prefix}.attn.indexer_topk") if kind == CSA else None
        self.split: Any = None  # tensor parallel: the process group whose ranks share the heads and sum outputs

    def split_heads(self, rank: int, world: int, group: Any = None) -> dict[str, tuple[int, int, int, int]]:
        """Tensor parallelism: as rank `rank` of the `world` ranks of `group`, keep heads [r*H/N, (r+1)*H/N) and
        their output groups (on meta, before loading); the shared KV, compressor and indexer stay whole.
        Returns {parameter: (dim, start, stop, full size)}."""
        if self.heads % world or self.groups % world:
            raise CheckpointError(f"tensor parallelism over {world} ranks needs heads ({self.heads}) and o_groups "
                                  f"({self.groups}) divisible by {world}")
        h, g, d, o = self.heads // world, self.groups // world, self.head_dim, self.wo_a.weight.shape[0] // self.groups
        cuts = {"wq_b.weight": (0, h * d), "attn_sink": (0, h), "wo_a.weight": (0, g * o), "wo_b.weight": (1, g * o)}
        out = {}
        for name, (dim, size) in cuts.items():
            p = self.get_parameter(name)
            out[name] = dim, rank * size, (rank + 1) * size, p.shape[dim]
            p.data = torch.empty((*p.shape[:dim], size, *p.shape[dim + 1:]), dtype=p.dtype, device="meta")
        self.heads, self.groups, self.split = h, g, group
        return out

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps).to(q.dtype)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        q = rope_tail(self.rotary, q, cos, sin)
        kv = rope_tail(self.rotary, self.norm(self.wkv(x))[:, None], cos, sin)  # [B, 1, T, D]: key = value
        k_pos, kv = remember(_sub(state, "window"), self.window, positions, kv=kv)
        pooled = visible = None
        if self.compressor is not None:
            entries = self.compressor(x, _sub(state, "compressor"))  # [B, N, D]
            complete = (positions + 1) // self.rate  # entries [0, complete) are whole for query t
            if self.indexer is None:
                pooled = entries[:, None]  # every query sees every complete entry: [B, 1, N, D]
                visible = torch.arange(entries.shape[1], device=x.device)[None, :] < complete[:, None]  # [T, N]
            else:
                chosen = self.hp_topk(self.indexer(x, q_latent, cos, sin, complete, _sub(state, "indexer")))
                visible = (chosen >= 0) & (chosen < complete[None, :, None])  # [B, T, k]
                pooled = entries[torch.arange(B)[:, None, None], chosen.clamp(0, max(entries.shape[1] - 1, 0))] \
                    if entries.shape[1] else entries.new_zeros(B, T, chosen.shape[-1], self.head_dim)
        hca = None  # HCA: every query attends all pooled entries, 1024 queries per call of the fused kernel
        if pooled is not None and self.indexer is None:
            if pooled.shape[2]:
                parts = [attend_pooled(q[:, :, i:i + 1024], pooled, visible[i:i + 1024], self.head_dim**-0.5)
                         for i in range(0, T, 1024)]
                hca = torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)
            pooled = visible = None
        block = max(self.window, 128)  # queries per block: each sees at most block + window - 1 raw keys
        out = torch.cat([self.attend(q[:, :, i:i + block], positions[i:i + block], kv, k_pos, pooled, visible, i,
                                     None if hca is None else (hca[0][:, :, i:i + block], hca[1][:, :, i:i + block]))
                         for i in range(0, T, block)], dim=2)
        out = rope_tail(self.rotary, out, cos, -sin).transpose(1, 2).reshape(B, T, self.groups, -1)
        w = dense_weight(self.wo_a, out.dtype).view(self.groups, -1, out.shape[-1])
        y = self.wo_b(torch.einsum("btgi,goi->btgo", out, w).flatten(2))
        if self.split is not None:
            dist.all_reduce(y, group=self.split)
        return y


    def attend(self, q: torch.Tensor, q_pos: torch.Tensor, kv: torch.Tensor, k_pos: torch.Tensor,
               pooled: torch.Tensor | None, visible: torch.Tensor | None, first: int,
               hca: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Queries q [B,H,t,D] at q_pos (rows first.. of the chunk) over the raw keys in their window and the
        CSA entries they chose (pooled [B,T,k,D], visible [B,T,k]), one softmax with the sink; or, for HCA,
        merged by log-sum-exp with their attention over the pooled entries, `hca` (`attend_pooled`'s output
        and log-sum-exp for these queries). Only the keys of this block's window are scored: O(t x window)."""
        B, t = q.shape[0], q.shape[2]
        scale = self.head_dim**-0.5
        lo = int(torch.searchsorted(k_pos, q_pos[0] - self.window + 1))
        hi = int(torch.searchsorted(k_pos, q_pos[-1], right=True))
        kv, k_pos = kv[:, :, lo:hi], k_pos[lo:hi]
        local = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - self.window)
        logits = [((q @ kv.transpose(-1, -2)).float() * scale).masked_fill(~local, float("-inf"))]
        sink = self.attn_sink.float().view(1, -1, 1, 1)
        if hca is not None:
            probs, lse = _softmax_part(logits[0])
            out_p, lse_p = hca
            total = torch.stack((lse, lse_p, sink[..., 0].expand_as(lse))).logsumexp(0)
            out = torch.exp(lse - total)[..., None] * (probs.to(kv.dtype) @ kv).float()
            return (out + torch.exp(lse_p - total)[..., None] * out_p.float()).to(kv.dtype)
        if pooled is not None:
            pooled, mask = pooled[:, first:first + t], visible[:, first:first + t]
            chosen = torch.einsum("bhtd,btkd->bhtk", q, pooled).float() * scale
            logits.append(chosen.masked_fill(~mask[:, None], float("-inf")))
        probs = torch.softmax(torch.cat((*logits, sink.expand(B, -1, t, 1)), dim=-1), dim=-1).to(kv.dtype)
        out = probs[..., : kv.shape[2]] @ kv
        if pooled is not None:
            out = out + torch.einsum("bhtk,btkd->bhtd", probs[..., kv.shape[2]: -1], pooled)
        return out


def _softmax_part(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim and its log-sum-exp; a row with no visible key gets zeros and -inf."""
    lse = logits.logsumexp(-1)
    return torch.exp(logits - lse.masked_fill(lse == float("-inf"), 0.0)[..., None]), lse  # no NaN, even in grads


def attend_pooled(q: torch.Tensor, pooled: torch.Tensor, visible: torch.Tensor, scale: float,
                  fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B,H,t,D] over pooled entries [B,1,N,D] (key = value) where `visible` [t,N]: output
    [B,H,t,D] and log-sum-exp [B,H,t] (fp32; -inf where a row sees no entry). On CPU without autograd, torch's
    fused flash kernel (no [t,N] logits written: 2x faster over 4K entries; its sums are not blocked alike for
    every number of queries, so chunkings agree to rounding, not bit for bit); else plain PyTorch."""
    B, H = q.shape[:2]
    if fused and q.device.type == "cpu" and not (torch.is_grad_enabled() and (q.requires_grad or pooled.requires_grad)):
        bias = torch.zeros(visible.shape, dtype=q.dtype).masked_fill_(~visible, float("-inf"))
        entries = pooled.expand(B, H, -1, -1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, entries, entries, 0.0, False, attn_mask=bias[None, None], scale=scale)
        return out, lse.masked_fill_(~visible.any(-1), float("-inf"))  # the kernel gives 0 where none is visible
    probs, lse = _softmax_part(((q @ pooled.transpose(-1, -2)).float() * scale).masked_fill(~visible, float("-inf")))
    return probs.to(pooled.dtype) @ pooled, lse


# ---------------------------------------------------------------- hyper-connections and layers


def mix_and_collapse(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> tuple[torch.Tensor, Callable]:
    """The mixing logits fn @ RMS-normalised streams [B,T,n*H] (fp32; the norm is a per-token scale, applied
    after the matmul instead of to a copy of the streams), and a function collapsing the streams with weights
    [B,T,n] into [B,T,H] (fp32 sums)."""
    x = streams.flatten(2).float()
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]  # no squared copy
    mix = F.linear(x, fn.float()) * torch.rsqrt(mean_square + eps)
    return mix, lambda pre: torch.matmul(pre[..., None, :], x.unflatten(-1, (streams.shape[2], -1))).squeeze(-2)


class HyperConnection(nn.Module):
    """mHC mixing for one block; parameters are the checkpoint's `hc_{attn,ffn}_{fn,base,scale}`.

    Hooks `{prefix}.pre` [B,T,n], `.post` [B,T,n] and `.comb` [B,T,n,n] (fp32) are the stream weights.
    """

    def __init__(self, args: Args, hooks: HookRegistry, prefix: str):
        super().__init__()
        n, hidden = args.hc_mult, args.hidden
        self.n, self.iters, self.eps, self.norm_eps = n, args.hc_iters, args.hc_eps, args.eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * hidden))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))
        self.hp_pre, self.hp_post = hooks.point(f"{prefix}.pre"), hooks.point(f"{prefix}.post")
        self.hp_comb = hooks.point(f"{prefix}.comb")

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block input [B,T,H], post [B,T,n], comb [B,T,n,n]) for streams [B,T,n,H]."""
        n = self.n
        mix, collapse = mix_and_collapse(streams, self.fn, self.norm_eps)
        pre, post, comb = mix.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.base.float().split([n, n, n * n])
        s = self.scale.float()
        pre = self.hp_pre(torch.sigmoid(pre * s[0] + b_pre) + self.eps)
        post = self.hp_post(2 * torch.sigmoid(post * s[1] + b_post))
        comb = torch.softmax((comb * s[2] + b_comb).unflatten(-1, (n, n)), dim=-1) + self.eps
        comb = self.hp_comb(sinkhorn(comb, self.iters, self.eps))
        return collapse(pre).to(streams.dtype), post, comb


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`iters` Sinkhorn normalisations of comb [..., n, n] (fp32): columns first, then rows and columns in turn,
    each divided by its sum + eps. On CPU without autograd one numba pass per token (the same divisions in the
    same order: 40 small tensor ops per call otherwise); else the PyTorch reference."""
    if comb.device.type == "cpu" and not (torch.is_grad_enabled() and comb.requires_grad) and comb.numel():
        out = comb.contiguous().clone()
        with torch_threads():
            _sinkhorn_kernel()(out.view(-1, *out.shape[-2:]).numpy(), iters, eps)
        return out
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


@functools.cache
def _sinkhorn_kernel():
    import numba  # imported on first use, as the indexer's kernel

    @numba.njit(parallel=True, nogil=True, cache=True)
    def run(comb, iters, eps):  # pragma: no cover - compiled
        eps = np.float32(eps)
        t, n, _ = comb.shape
        for i in numba.prange(t):
            c = comb[i]
            for it in range(2 * iters - 1):  # columns, then rows and columns in turn
                for a in range(n):
                    total = np.float32(0)
                    for b in range(n):
                        total += c[b, a] if it % 2 == 0 else c[a, b]
                    total += eps
                    for b in range(n):
                        if it % 2 == 0:
                            c[b, a] /= total
                        else:
                            c[a, b] /= total

    return run


def spread(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams: post * block output + comb^T @ old streams."""
    dtype = streams.dtype
    return post.to(dtype)[..., None] * out[:, :, None] + comb.to(dtype).transpose(-1, -2) @ streams


class HyperHead(nn.Module):
    """Collapses the streams before the final norm (`hc_head_{fn,base,scale}`); hook `final.hc_pre` [B,T,n]."""

    def __init__(self, args: Args, hooks: HookRegistry):
        super().__init__()
        n, self.eps, self.norm_eps = args.hc_mult, args.hc_eps, args.eps
        self.fn = nn.Parameter(torch.empty(n, n * args.hidden))
        self.base = nn.Parameter(torch.empty(n))
        self.scale = nn.Parameter(torch.empty(1))
        self.hp_pre = hooks.point("final.hc_pre")

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        mix, collapse = mix_and_collapse(streams, self.fn, self.norm_eps)
        pre = self.hp_pre(torch.sigmoid(mix * self.scale.float() + self.base.float()) + self.eps)
        return collapse(pre).to(streams.dtype)


class HashRouter(Router):
    """Hash routing: the experts of token t are `tid2eid[t]`; weights still come from the learned scores (no
    `router.margin`: no score decides the selection)."""

    margins = False

    def __init__(self, hidden: int, spec: RouterSpec, hooks: HookRegistry, prefix: str, vocab: int):
        super().__init__(hidden, spec, hooks, prefix)
        self.tid2eid = nn.Parameter(torch.empty(vocab, spec.top_k, dtype=torch.long), requires_grad=False)

    def select(self, scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.tid2eid[token_ids]


class Layer(nn.Module):
    """One V4 block pair on the streams: mHC-collapsed input -> attention -> spread, then the same for the MoE."""

    def __init__(self, args: Args, attn: V4Attention, ffn: MoE, hooks: HookRegistry, prefix: str):
        super().__init__()
        hidden, eps = args.hidden, args.eps
        self.hp_pre = hooks.point(f"{prefix}.resid_pre")
        self.hc_attn = HyperConnection(args, hooks, f"{prefix}.hc.attn")
        self.attn_norm, self.attn = RMSNorm(hidden, eps), attn
        self.hp_attn = hooks.point(f"{prefix}.attn.out")
        self.hp_mid = hooks.point(f"{prefix}.resid_mid")
        self.hc_ffn = HyperConnection(args, hooks, f"{prefix}.hc.ffn")
        self.ffn_norm, self.ffn = RMSNorm(hidden, eps), ffn
        self.hp_post = hooks.point(f"{prefix}.resid_post")

    def forward(self, x: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor,
                state: dict | None = None) -> torch.Tensor:
        x = self.hp_pre(x)
        h, post, comb = self.hc_attn(x)
        x = self.hp_mid(spread(x, self.hp_attn(self.attn(self.attn_norm(h), positions, state)), post, comb))
        h, post, comb = self.hc_ffn(x)
        return self.hp_post(spread(x, self.ffn(self.ffn_norm(h), token_ids), post, comb))


class DeepseekV4(CausalLM):
    """V4's decoder: residual streams [B, T, hc_mult, H] between embedding and `hc_head`."""

    appended_state = ("entries",)  # the compressors' pooled entries

    @property
    def bounded_state(self) -> bool:
        """True: a window of raw keys, a compressor's pending tokens and its append-only pooled entries."""
        return True

    def __init__(self, cfg: Config, args: Args, hooks: HookRegistry, layers):
        super().__init__(cfg, args, hooks, layers)
        self.streams = args.hc_mult
        self.hc_head = HyperHead(args, hooks)
        hooks.sort()
        # integer tables and the bound their values must stay under (checked on load)
        self.index_tables = {f"layers.{i}.ffn.router.tid2eid": args.router.experts
                             for i, layer in self.layers.items() if isinstance(layer.ffn.router, HashRouter)}

    def forward(self, input_ids: torch.Tensor, *, cache: State | None = None, head: bool = True) -> torch.Tensor | None:
        """Logits [B, T, vocab]; with `cache=State()` the sequence may be fed chunk by chunk (state per layer:
        the sliding window's keys, each compressor's pending tokens and pooled entries). `head=False`: as in
        `CausalLM.forward`, the hyper-connection head included."""
        input_ids, positions = self._start(input_ids, cache)
        x = self.embed(input_ids)[:, :, None].expand(-1, -1, self.streams, -1).contiguous()
        for i, layer in self.layers.items():
            x = layer(x, positions, input_ids, None if cache is None else cache.layers.setdefault(i, {}))
        return self._finish(self.hc_head(x) if head else x, cache, head)


def build(cfg: Config) -> DeepseekV4:
    """The model for a DeepSeek-V4 config.json (HF `deepseek_v4` or the official inference config)."""
    args = Args.from_config(cfg)
    hooks = HookRegistry()
    rotary = {kind: Rotary(args.rope_dim, params, interleaved=True) for kind, params in args.ropes.items()}

    def layer(i: int) -> Layer:
        p, kind = f"layers.{i}", args.types[i]
        attn = V4Attention(args, kind, rotary["main" if kind == SLIDING else "compress"], args.rates.get(kind, 1),
                           hooks, p)
        router = (lambda *a: HashRouter(*a, args.vocab)) if args.hashed[i] else None
        ffn = MoE(args.hidden, args.hash_router if args.hashed[i] else args.router, args.inter, hooks, p,
                  act=args.act, shared_inter=args.inter, limit=args.limit, router=router)
        return Layer(args, attn, ffn, hooks, p)

    return DeepseekV4(cfg, args, hooks, ((i, layer(i)) for i in range(args.layers)))


def rules(cfg: Config) -> list[Rule]:
    """Official names (`embed`, `head`, `layers.N.attn.*`, `ffn.experts.E.w1`...) with or without the `model.`
    prefix transformers writes; the multi-token-prediction module (`mtp.*`) is skipped."""
    P = r"(?:model\.)?"
    L, F_ = P + r"layers\.(\d+)\.", r"layers.\1.ffn."
    experts = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    return [
        Rule(P + r"mtp\..*", ()),
        Rule(r"(?:embed|model\.embed_tokens)\.weight", ("embed.weight",)),
        Rule(r"(?:head|lm_head)\.weight", ("lm_head.weight",)),
        Rule(P + r"norm\.weight", ("norm.weight",)),
        Rule(P + r"hc_head(?:_|\.hc_)(fn|base|scale)", (r"hc_head.\1",)),
        Rule(L + r"(attn_norm|ffn_norm)\.weight", (r"layers.\1.\2.weight",)),
        Rule(L + r"hc_(attn|ffn)_(fn|base|scale)", (r"layers.\1.hc_\2.\3",)),
        Rule(L + r"attn\.(.+)", (r"layers.\1.attn.\2",)),
        Rule(L + r"ffn\.gate\.weight", (F_ + "router.weight",)),
        Rule(L + r"ffn\.gate\.bias", (F_ + "router.correction_bias",)),
        Rule(L + r"ffn\.gate\.tid2eid", (F_ + "router.tid2eid",)),
        *(Rule(L + rf"ffn\.experts\.(\d+)\.{w}\.weight", (F_ + rf"experts.{ours}[\2]",))
          for w, ours in experts.items()),
        *(Rule(L + rf"ffn\.shared_experts\.{w}\.weight", (F_ + f"shared.{ours}.weight",))
          for w, ours in experts.items()),
    ]
