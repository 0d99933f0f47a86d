"""Building blocks shared by the model families: norms, rotary embeddings, attention, MLPs, the MoE block."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..distributed import moe_forward
from ..errors import CheckpointError
from ..hooks import HookRegistry
from ..parallel import torch_threads


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu}


def activation(cfg: Config, key: str = "hidden_act") -> Any:
    """The activation function a config names."""
    return ACTIVATIONS[cfg.choice(key, tuple(ACTIVATIONS), "silu")]


# ---------------------------------------------------------------- rotary


def rope_frequencies(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the cos/sin scale ("attention factor") of the rope type."""
    base = float(params["rope_theta"])
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    kind = params["rope_type"]
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(params["factor"]), 1.0
    if kind == "llama3":
        factor, lo, hi = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mixed = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old / lo, inv / factor, inv)
        return torch.where((wavelen >= old / hi) & (wavelen <= old / lo), mixed, out), 1.0
    if kind == "yarn":
        return _yarn(inv, dim, base, params)
    raise CheckpointError(f"rope type {kind!r} is not supported (default, linear, llama3, yarn)")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction: 0.1 * mscale * ln(scale) + 1 for scale > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv: torch.Tensor, dim: int, base: float, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv:2309.00071): interpolate low frequencies, keep high ones, blend with a linear ramp."""
    factor = float(p["factor"])
    orig = float(p["original_max_position_embeddings"])
    if p.get("attention_factor") is not None:
        attn = float(p["attention_factor"])
    elif p.get("mscale") and p.get("mscale_all_dim"):
        attn = yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
    else:
        attn = yarn_mscale(factor)
    fast, slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    return inv / factor * ramp + inv * (1 - ramp), attn


class Rotary:
    """Rotary position embedding over the first `dim` channels of each head.

    `interleaved=True` rotates adjacent pairs (DeepSeek's MLA layout); otherwise the two halves are
    paired (the rotate-half layout of Llama and most HF checkpoints).
    """

    def __init__(self, dim: int, params: dict[str, Any], interleaved: bool = False):
        self.dim, self.interleaved = dim, interleaved
        self.inv_freq, self.scale = rope_frequencies(dim, params)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [T, dim/2] for absolute positions."""
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, heads, T, D]; channels past `dim` pass through unchanged."""
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        if self.interleaved:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        else:
            a, b = rot.chunk(2, dim=-1)
            rot = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


# ---------------------------------------------------------------- attention


def remember(state: dict[str, torch.Tensor] | None, window: int | None, positions: torch.Tensor,
             **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Append this chunk's keys/values (tensors [B, heads, T, *]) to a layer's state and return all of them.

    The state then keeps only what later chunks can attend to: the last `window - 1` positions for a
    sliding layer, everything otherwise. With no state (a whole-sequence forward) the chunk is returned.
    """
    if state is None:
        return (positions, *new.values())
    full = {"pos": torch.cat((state["pos"], positions)) if state else positions}
    for name, t in new.items():
        full[name] = torch.cat((state[name], t), dim=2) if state else t
    keep = full["pos"] > positions[-1] + 1 - window if window is not None else slice(None)
    state.update(pos=full["pos"][keep], **{n: full[n][:, :, keep] for n in new})
    return tuple(full.values())


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention: q [B,Hq,T,D], k/v [B,Hkv,S,*]; GQA by head groups.

    `window` keeps keys with q_pos - k_pos < window; `sinks` [Hq] adds one learned logit per head to the
    softmax denominator (it absorbs probability mass but contributes no value).
    """
    if sinks is None and q.shape[-1] != v.shape[-1]:
        # MLA's value heads are narrower than its query/key heads; torch's fused CPU kernel needs one head size:
        # zero padding changes no dot product and no value, and avoids materialising the [T, S] scores
        d = max(q.shape[-1], v.shape[-1])
        pad = [F.pad(t, (0, d - t.shape[-1])) for t in (q, k, v)]
        return attend(*pad, q_pos, k_pos, scale, window)[..., : v.shape[-1]]
    gqa = q.shape[1] != k.shape[1]
    if sinks is None and window is None and torch.equal(q_pos, k_pos):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


def topk_entries(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k highest scores, best first, ties to the lower index; -1 where the pick is -inf.

    Deterministic whatever the number of rows or columns (so chunked and whole-sequence runs agree): one
    top-k pass, plus a stable re-pick only for the rows where the k-th score ties with one left out.
    """
    if scores.shape[-1] < k:
        scores = F.pad(scores, (0, k - scores.shape[-1]), value=float("-inf"))
    value, picked = scores.topk(k, dim=-1)
    threshold = value[..., -1:]
    ambiguous = (torch.isfinite(threshold) & ((scores >= threshold).sum(-1, keepdim=True) > k)).squeeze(-1)
    if ambiguous.any():
        rows = scores[ambiguous]
        above, tie = rows > threshold[ambiguous], rows == threshold[ambiguous]
        take = above | (tie & (tie.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
        index = torch.arange(rows.shape[-1], device=rows.device).expand_as(rows)
        picked[ambiguous] = torch.where(take, index, rows.shape[-1]).topk(k, dim=-1, largest=False).values
    picked = picked.sort(dim=-1).values  # best first, equal scores by index: a stable sort on index order
    value = scores.gather(-1, picked)
    order = torch.sort(value, dim=-1, descending=True, stable=True).indices
    return picked.gather(-1, order).masked_fill(value.gather(-1, order) == float("-inf"), -1)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer scores [t, N] (fp32): entry s scores sum_h w[t, h] * ReLU(q[t, h] . keys_t[:, s]) for
    s < limit[t], -inf beyond. q [t, H, D], w [t, H] and keys_t [D, N] are fp32."""
    t, heads, n = q.shape[0], q.shape[1], keys_t.shape[1]
    per_head = (q.flatten(0, 1) @ keys_t).view(t, heads, n).relu_()
    scores = per_head[:, 0] * w[:, :1]
    for h in range(1, heads):
        scores += per_head[:, h] * w[:, h, None]
    lo = int(limit.min())  # entries below lo are visible to every query
    scores[:, lo:].masked_fill_(torch.arange(lo, n, device=q.device)[None] >= limit[:, None], float("-inf"))
    return scores


INDEX_ROWS, INDEX_TILE = 256, 2048  # (query, head) rows x entries scored at once: 2 MiB of dot products


def index_topk(q: torch.Tensor, w: torch.Tensor, keys_t: torch.Tensor, limit: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries [t, k] with the highest `index_scores` (best first, ties to the lower index, -1 padded),
    in bounded memory at any N. On CPU, tile by tile: a matmul for a few queries' dot products with a tile of
    entries, then one fused pass (numba) that scores the tile and keeps a running top-k per query, so no
    [t, N] score map is written and read back. Elsewhere, `topk_entries` of `index_scores` a few queries
    at a time. Both give the same picks bit for bit."""
    q, w, keys_t = q.detach(), w.detach(), keys_t.detach()  # picks are indices: no gradient flows through them
    t, heads, n = q.shape[0], q.shape[1], keys_t.shape[1]
    queries = max(1, INDEX_ROWS // heads)
    if q.device.type != "cpu":
        queries = max(queries, (INDEX_ROWS * INDEX_TILE) // max(1, heads * n))
        return torch.cat([topk_entries(index_scores(q[i:i + queries], w[i:i + queries], keys_t, limit[i:i + queries]), k)
                          for i in range(0, t, queries)]) if t else q.new_empty(0, k, dtype=torch.long)
    scan = _index_topk_kernel()
    value = np.full((t, k), -np.inf, dtype=np.float32)
    index = np.full((t, k), -1, dtype=np.int64)
    dots = torch.empty(queries * heads, min(n, INDEX_TILE))
    limit_np, w_np = limit.numpy(), w.contiguous().numpy()
    for i in range(0, t, queries):
        rows = q[i:i + queries].flatten(0, 1)
        for start in range(0, min(n, int(limit[i:i + queries].max())), INDEX_TILE):
            tile = keys_t[:, start:start + INDEX_TILE]
            out = dots[: rows.shape[0], : tile.shape[1]]
            torch.mm(rows, tile, out=out)
            with torch_threads():
                scan(out.numpy().reshape(-1, heads, tile.shape[1]), w_np[i:i + queries], limit_np[i:i + queries],
                     start, value[i:i + queries], index[i:i + queries])
    _order(value, index)
    return torch.from_numpy(index)


@functools.cache
def _index_topk_kernel():
    import numba  # only the V4 indexer on CPU needs it: imported on first use

    @numba.njit(parallel=True, nogil=True, cache=True)
    def scan(dots, w, limit, start, value, index):  # pragma: no cover - compiled
        """Fold entries start.. (dots [t, H, n]: one tile's dot products) into each query's running top-k."""
        t, heads, n = dots.shape
        k = value.shape[1]
        for i in numba.prange(t):
            val, idx = value[i], index[i]
            worst = 0  # slot of the lowest (value, then highest index): the one a better entry replaces
            for j in range(k):
                if val[j] < val[worst] or (val[j] == val[worst] and idx[j] > idx[worst]):
                    worst = j
            score = np.empty(256, dtype=np.float32)
            m = min(limit[i] - start, n)
            for s0 in range(0, m, 256):  # score a strip (vectorised), then scan it for entries beating the worst
                size = min(256, m - s0)
                for s in range(size):
                    score[s] = max(dots[i, 0, s0 + s], np.float32(0)) * w[i, 0]
                for h in range(1, heads):
                    for s in range(size):
                        score[s] += max(dots[i, h, s0 + s], np.float32(0)) * w[i, h]
                for s in range(size):
                    if score[s] > val[worst] or idx[worst] < 0:
                        val[worst], idx[worst] = score[s], start + s0 + s
                        for j in range(k):  # entries come in index order: among equal values the later is worst
                            if val[j] < val[worst] or (val[j] == val[worst] and idx[j] > idx[worst]):
                                worst = j

    return scan


def _order(value: np.ndarray, index: np.ndarray) -> None:
    """Sort each row's picks best first, equal values by index, empty slots (-1) last; in place."""
    key = np.where(index < 0, np.inf, -value.astype(np.float64))
    order = np.lexsort((index, key), axis=-1)
    value[:] = np.take_along_axis(value, order, -1)
    index[:] = np.take_along_axis(index, order, -1)


class Attention(nn.Module):
    """Grouped-query attention with optional QKV/O bias, q/k RMSNorm, sliding window and attention sinks.

    `qk_norm`: None, "head" (per-head RMSNorm over head_dim, Qwen3) or "full" (over the whole
    projection, OLMoE). `clip` clamps q, k (after a "full" norm) and v to [-clip, clip] (OLMoE's clip_qkv).
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        rotary: Rotary,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
        eps: float = 1e-6,
        window: int | None = None,
        sinks: bool = False,
        clip: float | None = None,
    ):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rotary, self.window, self.qk_norm, self.clip = rotary, window, qk_norm, clip
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=o_bias)
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(heads * head_dim, eps), RMSNorm(kv_heads * head_dim, eps)
        self.sinks = nn.Parameter(torch.empty(heads)) if sinks else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary.cos_sin(positions, q.dtype)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        k_pos, k, v = remember(state, self.window, positions, k=k, v=v)
        out = attend(q, k, v, positions, k_pos, self.head_dim**-0.5, self.window, self.sinks)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def gqa(cfg: Config, **options: Any) -> Attention:
    """Attention sized by the standard HF fields (hidden_size, attention/KV heads, head_dim, rope)."""
    hidden, heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
    head_dim = cfg.int("head_dim", hidden // heads)
    kv_heads = cfg.int("num_key_value_heads", heads)
    return Attention(hidden, heads, kv_heads, head_dim, Rotary(head_dim, cfg.rope()), **options)


# ---------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """Dense gated MLP: down(act(gate(x)) * up(x)); `limit` clamps gate above and up both sides (DeepSeek-V4)."""

    def __init__(self, hidden: int, inter: int, act: Any = F.silu, limit: float | None = None):
        super().__init__()
        self.act, self.limit = act, limit
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.down_proj(self.act(gate) * up)


class DenseFFN(MLP):
    """A dense MLP block at a layer position, with its `mlp.out` hook."""

    def __init__(self, hidden: int, inter: int, act: Any, hooks: HookRegistry, prefix: str):
        super().__init__(hidden, inter, act)
        self.hp_out = hooks.point(f"{prefix}.mlp.out")

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Same call as MoE; a dense block does not look at the token ids."""
        return self.hp_out(super().forward(x))


@dataclass(frozen=True)
class RouterSpec:
    """How a family turns router logits into expert ids and weights (see REFERENCES: routing, per family).

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


def select_experts(scores: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None) -> torch.Tensor:
    """Top-k expert ids [N, k] from fp32 scores [N, E]: the bias steers selection only, groups dropped by
    group-limited routing are masked with -inf, ties go to the lower index."""
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
    return torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, : spec.top_k]


def weigh_experts(scores: torch.Tensor, ids: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Weights [N, k] that multiply the outputs of experts `ids`, from the unbiased scores."""
    w = scores.gather(1, ids)
    if spec.weight_softmax:
        w = w.softmax(dim=-1)
    elif spec.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + spec.norm_eps)
    return w * spec.scaling


class Router(nn.Module):
    """Linear router with the family's selection rule; fires the `router.*` hooks in the order they are made.

    Selection may use a correction bias and group limits; the weights are then computed for the
    (possibly hook-edited) ids, so forcing ids yields the weights the router would give those experts.
    """

    def __init__(self, hidden: int, spec: RouterSpec, hooks: HookRegistry, prefix: str):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.experts, hidden))
        self.bias = nn.Parameter(torch.empty(spec.experts)) if spec.logit_bias else None
        self.correction_bias = nn.Parameter(torch.empty(spec.experts)) if spec.correction_bias else None
        self.hp_logits = hooks.point(f"{prefix}.router.logits")
        self.hp_scores = hooks.point(f"{prefix}.router.scores")
        self.hp_ids = hooks.point(f"{prefix}.router.topk_ids")
        self.hp_weights = hooks.point(f"{prefix}.router.topk_weights")
        self.backend = "torch"  # "triton": select and weigh in one kernel (workbench.kernels.route)

    def select(self, scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Top-k expert ids [N, k] from fp32 scores [N, E] of tokens `token_ids` [N]; ties go to the lower index."""
        return select_experts(scores, self.spec, self.correction_bias)

    def weigh(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Weights [N, k] that multiply the outputs of experts `ids`."""
        return weigh_experts(scores, ids, self.spec)

    def forward(self, x: torch.Tensor, shape: tuple[int, ...],
                token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route flat tokens x [N, H] with ids [N]; hooks see token-major tensors of `shape` [B, T, ...]."""
        logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        logits = self.hp_logits(logits.view(*shape, -1)).flatten(0, -2)
        if self.backend == "triton" and not self.hp_scores.active and type(self).select is Router.select:
            from ..kernels import route

            chosen, weights = route(logits, self.spec, self.correction_bias)
            ids = self.hp_ids(chosen.view(*shape, -1)).flatten(0, -2)
            if not torch.equal(ids, chosen):
                weights = self.weigh(router_scores(logits, self.spec.score), ids)  # a hook chose other experts
            weights = weights.view(*shape, -1)
        else:
            scores = self.hp_scores(router_scores(logits, self.spec.score).view(*shape, -1)).flatten(0, -2)
            ids = self.hp_ids(self.select(scores, token_ids).view(*shape, -1)).flatten(0, -2)
            weights = self.weigh(scores, ids).view(*shape, -1)
        weights = self.hp_weights(weights, topk_ids=ids.view(*shape, -1)).flatten(0, -2)
        return ids, weights


def expert_blocks(ends: list[int]) -> Iterator[tuple[int, slice]]:
    """(expert, its rows) of rows sorted by expert, expert e owning rows ends[e-1]..ends[e]; empty experts skipped."""
    for e, (start, end) in enumerate(zip([0, *ends], ends)):
        if end > start:
            yield e, slice(start, end)


class Experts(nn.Module):
    """Routed experts stored stacked ([E, I, H] gate/up, [E, H, I] down), computed one expert at a time.

    `limit` clamps gate above and up both sides before the GLU (DeepSeek-V4, GPT-OSS); `alpha` selects
    GPT-OSS's variant out = (up + 1) * gate * sigmoid(alpha * gate) instead of act(gate) * up.
    """

    def __init__(self, n: int, hidden: int, inter: int, act: Any = F.silu, *, bias: bool = False,
                 limit: float | None = None, alpha: float | None = None):
        super().__init__()
        self.act, self.limit, self.alpha = act, limit, alpha
        self.gate_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))
        if bias:
            self.gate_bias = nn.Parameter(torch.empty(n, inter))
            self.up_bias = nn.Parameter(torch.empty(n, inter))
            self.down_bias = nn.Parameter(torch.empty(n, hidden))
        else:
            self.gate_bias = self.up_bias = self.down_bias = None

    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's activated hidden state for rows x [n, H]."""
        gate = F.linear(x, self.gate_proj[e], None if self.gate_bias is None else self.gate_bias[e])
        up = F.linear(x, self.up_proj[e], None if self.up_bias is None else self.up_bias[e])
        return self.glu(gate, up)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The gated activation of gate and up projections (clamped first where the family clamps)."""
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        if self.alpha is None:
            return self.act(gate) * up
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    def grouped_hidden(self, rows: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """Activated hidden states of rows [n, H] sorted by expert (expert e owns rows ends[e-1]..ends[e]): each
        expert's rows one contiguous block, written in place; the activation stays per block, in cache."""
        hidden = rows.new_empty(len(rows), self.gate_proj.shape[1])
        for e, block in expert_blocks(ends):
            hidden[block] = self.hidden(e, rows[block])
        return hidden

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's output for activated hidden rows h [n, I]."""
        return F.linear(h, self.down_proj[e], None if self.down_bias is None else self.down_bias[e])

    def grouped_down(self, hidden: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """Outputs [n, H] of activated hidden rows sorted by expert (as in `grouped_hidden`)."""
        out = hidden.new_empty(len(hidden), self.down_proj.shape[1])
        for e, block in expert_blocks(ends):
            out[block] = self.down(e, hidden[block])
        return out


class MoE(nn.Module):
    """Router + routed experts + optional (gated) shared expert, with the per-expert hooks.

    Per-expert hidden/out tensors are only materialised (token-major, [B,T,k,*]) while a hook asks
    for them; otherwise each expert's rows are scattered straight into the output. With `parallel` set
    (expert parallelism, see workbench.distributed) `experts` holds only this rank's range of experts.
    """

    def __init__(self, hidden: int, spec: RouterSpec, inter: int, hooks: HookRegistry, prefix: str, *,
                 act: Any = F.silu, shared_inter: int | None = None, shared_gate: bool = False,
                 expert_bias: bool = False, limit: float | None = None, alpha: float | None = None,
                 router: type[Router] | None = None):
        super().__init__()
        self.router = (router or Router)(hidden, spec, hooks, prefix)
        self.experts = Experts(spec.experts, hidden, inter, act, bias=expert_bias, limit=limit, alpha=alpha)
        self.shared = MLP(hidden, shared_inter, act, limit) if shared_inter else None
        self.shared_gate = nn.Linear(hidden, 1, bias=False) if shared_gate else None
        self.hp_hidden = hooks.point(f"{prefix}.experts.hidden")
        self.hp_expert_out = hooks.point(f"{prefix}.experts.out")
        self.hp_shared = hooks.point(f"{prefix}.shared.out") if self.shared is not None else None
        self.hp_out = hooks.point(f"{prefix}.moe.out")
        self.parallel: Any = None  # workbench.distributed.ExpertParallel under expert parallelism
        self.backend = "torch"  # how routed experts run: "torch" (reference loop), "grouped", "triton"

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] of tokens token_ids [B, T] (hash routing selects by token id)."""
        shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if self.parallel is not None:
            return self.hp_out(moe_forward(self, flat, token_ids.reshape(-1), shape).view_as(x))
        ids, weights = self.router(flat, shape, token_ids.reshape(-1))
        y = self.routed(flat, ids, weights.to(x.dtype), shape)
        if self.shared is not None:
            y = y + self.hp_shared(self.shared_out(flat).view_as(x)).view_as(flat)
        return self.hp_out(y.view_as(x))

    def shared_out(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's output for rows x [n, H], gated where the family gates it."""
        s = self.shared(x)
        return torch.sigmoid(self.shared_gate(x)) * s if self.shared_gate is not None else s

    def routed(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Sum_k weights[:, k] * expert_{ids[:, k]}(x), one expert at a time (the reference loop)."""
        if self.backend == "grouped":
            return self.grouped(x, ids, weights, shape)
        if self.backend == "triton":
            return self.fused(x, ids, weights, shape)
        N, k = ids.shape
        groups = [(e, *torch.where(ids == e)) for e in ids.unique().tolist()]
        hidden = None
        if self.hp_hidden.active:
            hidden = x.new_zeros(N, k, self.experts.down_proj.shape[-1])
            for e, tok, slot in groups:
                hidden[tok, slot] = self.experts.hidden(e, x[tok])
            hidden = self.hp_hidden(hidden.view(*shape, k, -1), topk_ids=ids.view(*shape, k)).view(N, k, -1)
        y = torch.zeros_like(x)
        outs = x.new_zeros(N, k, x.shape[-1]) if self.hp_expert_out.active else None
        for e, tok, slot in groups:
            h = hidden[tok, slot] if hidden is not None else self.experts.hidden(e, x[tok])
            o = self.experts.down(e, h)
            if outs is not None:
                outs[tok, slot] = o
            else:
                y.index_add_(0, tok, o * weights[tok, slot, None])
        if outs is not None:
            outs = self.hp_expert_out(outs.view(*shape, k, -1), topk_ids=ids.view(*shape, k)).view(N, k, -1)
            y = (outs * weights[..., None]).sum(dim=1)
        return y

    def grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The same sum with the (token, slot) pairs sorted by expert: one gather, each expert's rows one contiguous
        matmul, one scatter-add (the CPU fast path). Per-expert hooks get token-major copies of the sorted
        buffers, made only while a hook asks."""
        N, k = ids.shape
        pairs = ids.flatten()
        order = torch.sort(pairs, stable=True).indices  # row-major within each expert
        ends = torch.bincount(pairs, minlength=self.experts.gate_proj.shape[0]).cumsum(0).tolist()
        rows, tokens = x[order // k], order // k
        if not (self.hp_hidden.active or self.hp_expert_out.active):  # each block straight into the output
            y, w = torch.zeros_like(x), weights.flatten()[order, None]
            for e, block in expert_blocks(ends):
                out = self.experts.down(e, self.experts.hidden(e, rows[block]))
                y.index_add_(0, tokens[block], out * w[block])
            return y
        hidden = self.experts.grouped_hidden(rows, ends)
        if self.hp_hidden.active:
            hidden = self._token_major(self.hp_hidden, hidden, order, ids, shape)
        out = self.experts.grouped_down(hidden, ends)
        if self.hp_expert_out.active:
            outs = self._token_major(self.hp_expert_out, out, order, ids, shape, keep_order=False)
            return (outs.view(N, k, -1) * weights[..., None]).sum(dim=1)
        return torch.zeros_like(x).index_add_(0, tokens, out * weights.flatten()[order, None])

    def _token_major(self, hp: Any, rows: torch.Tensor, order: torch.Tensor, ids: torch.Tensor,
                     shape: tuple[int, ...], keep_order: bool = True) -> torch.Tensor:
        """Rows sorted by expert -> token-major [B, T, k, D] through the hook; back in expert order if `keep_order`."""
        k = ids.shape[1]
        tm = torch.empty_like(rows)
        tm[order] = rows
        tm = hp(tm.view(*shape, k, -1), topk_ids=ids.view(*shape, k)).reshape(len(rows), -1)
        return tm[order] if keep_order else tm

    def fused(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The same sum by the Triton kernels (workbench.kernels): row gather, grouped GEMMs and the gated activation
        fused. Per-expert hooks read the kernels' own token-major intermediates; after a hook edits them the later
        stages rerun on the edit."""
        from ..kernels import expert_out, fused_experts, moe_sum

        ex = self.experts
        if ex.alpha is None and ex.act is not F.silu:
            return self.grouped(x, ids, weights, shape)  # the kernels fuse SiLU gates (and GPT-OSS's) only
        N, k = ids.shape
        want_hidden, want_out = self.hp_hidden.active, self.hp_expert_out.active
        biases = None if ex.gate_bias is None else (ex.gate_bias, ex.up_bias, ex.down_bias)
        y, hidden, outs = fused_experts(x, ids, weights, ex.gate_proj, ex.up_proj, ex.down_proj, limit=ex.limit,
                                        alpha=ex.alpha, biases=biases, want_hidden=want_hidden, want_out=want_out)
        if want_hidden:
            edited = self.hp_hidden(hidden.view(*shape, k, -1), topk_ids=ids.view(*shape, k)).view(N, k, -1)
            if not torch.equal(edited, hidden):
                outs = expert_out(edited, ids, None, ex.down_proj, bias=ex.down_bias)
                y = moe_sum(outs, weights)
        if want_out:
            outs = self.hp_expert_out(outs.view(*shape, k, -1), topk_ids=ids.view(*shape, k)).view(N, k, -1)
            y = moe_sum(outs, weights)
        return y
