"""DeepSeek-V3.2 (DSA): V3's MLA and MoE, plus a lightning indexer that lets each query attend only to the
`index_topk` earlier keys it scores highest (docs/references.md, "Attention").

Indexer: per-head queries from the normed q latent, one shared key per token (LayerNorm with bias), rotate-half
RoPE on the first `qk_rope_head_dim` channels of both (unlike MLA's interleaved layout); the score of key s
for query t is sum_h w_h(t) * ReLU(q_h(t) . k(s)) * D^-0.5 with w = weights_proj(x) * H^-0.5, all in fp32.
The Hadamard rotation and FP8 scoring of DeepSeek's kernels preserve these dot products (up to rounding)
and are not reproduced here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import CheckpointError
from ..hooks import HookRegistry
from . import deepseek
from .base import CausalLM, Rule
from .indexer import topk_entries
from .layers import Linear, Rotary, dense_weight
from .mla import MLA

INDEX_KEY_EPS = 1e-6  # the indexer key LayerNorm's eps (fixed, not the config's rms_norm_eps)


@dataclass(frozen=True, kw_only=True)
class Args(deepseek.Args):
    """V3's fields and the indexer's."""

    index_heads: int
    index_dim: int  # width of each indexer query head and of the shared indexer key
    index_topk: int  # keys each query attends to

    @classmethod
    def from_config(cls, cfg: Config) -> Args:
        v3 = deepseek.Args.from_config(cfg)
        if v3.mla.q_rank is None:
            raise CheckpointError("DeepSeek-V3.2 needs q_lora_rank (the indexer reads the q latent)", file=cfg.file)
        heads, dim = cfg.int("index_n_heads", 64), cfg.int("index_head_dim", 128)
        if dim < v3.mla.rope:
            raise CheckpointError(f"index_head_dim={dim} is smaller than qk_rope_head_dim={v3.mla.rope}",
                                  file=cfg.file)
        return cls(**vars(v3), index_heads=heads, index_dim=dim, index_topk=cfg.int("index_topk", 2048))


class Indexer(nn.Module):
    """Scores every visible key for every query; names follow the checkpoint's `self_attn.indexer.*`."""

    def __init__(self, args: Args, rotary: Rotary):
        super().__init__()
        self.heads, self.dim, self.rotary = args.index_heads, args.index_dim, rotary
        self.wq_b = Linear(args.mla.q_rank, self.heads * self.dim, bias=False)
        self.wk = Linear(args.hidden, self.dim, bias=False)
        self.k_norm = nn.LayerNorm(self.dim, eps=INDEX_KEY_EPS)
        self.weights_proj = Linear(args.hidden, self.heads, bias=False)

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The shared indexer key [B, 1, T, D] (rotated), as the layer state keeps it."""
        return self.rotary.apply(self.k_norm(self.wk(x))[:, None], cos, sin)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor) -> torch.Tensor:
        """fp32 index scores [B, T, S] of this chunk's queries against all visible keys [B, 1, S, D]."""
        B, T, _ = x.shape
        q = self.wq_b(q_latent).view(B, T, self.heads, self.dim).transpose(1, 2)
        q = self.rotary.apply(q, cos, sin)
        per_head = torch.relu(q.float() @ keys.float().transpose(-1, -2)) * self.dim**-0.5  # [B, H, T, S]
        w = F.linear(x.float(), dense_weight(self.weights_proj, x.dtype).float()) * self.heads**-0.5  # [B, T, H]
        return torch.einsum("bth,bhts->bts", w, per_head)


class SparseMLA(MLA):
    """MLA where each query sees only the causal keys the indexer selects.

    Hook `{prefix}.attn.indexer_topk` [B, T, index_topk] (int64): the absolute key positions each query
    attends to, best first; -1 pads rows with fewer visible keys than `index_topk`. A hook may rewrite it
    to choose the keys (non-causal or unknown positions are ignored).
    """

    def __init__(self, args: Args, rotary: Rotary, scale: float, index_rotary: Rotary, hooks: HookRegistry,
                 prefix: str):
        super().__init__(args.hidden, args.mla, rotary, scale)
        self.topk = args.index_topk
        self.indexer = Indexer(args, index_rotary)
        self.hp_topk = hooks.point(f"{prefix}.attn.indexer_topk")

    def select(self, scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Top-k causal key positions [B, T, topk] (ties: the earlier key), -1 where too few keys are visible."""
        causal = k_pos[None, :] <= q_pos[:, None]
        chosen = topk_entries(scores.masked_fill(~causal, float("-inf")), self.topk)
        return torch.where(chosen >= 0, k_pos[chosen.clamp(min=0)], -1)

    @staticmethod
    def allowed(chosen: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean mask [B, T, S]: key s is chosen for query t and causal."""
        S = len(k_pos)
        idx = torch.searchsorted(k_pos, chosen.clamp(min=0)).clamp(max=S - 1)
        hit = (chosen >= 0) & (k_pos[idx] == chosen)
        mask = torch.zeros(*chosen.shape[:-1], S + 1, dtype=torch.bool, device=chosen.device)
        mask.scatter_(-1, idx.masked_fill(~hit, S), True)
        return mask[..., :S] & (k_pos[None, :] <= q_pos[:, None])

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        q_latent, kv_a = self.latents(x)
        icos, isin = self.indexer.rotary.cos_sin(positions, x.dtype)
        q, k, v, k_pos, index_k = self.qkv(q_latent, kv_a, positions, state, index_k=self.indexer.key(x, icos, isin))
        chosen = self.select(self.indexer.scores(x, q_latent, icos, isin, index_k), positions, k_pos)
        chosen = self.hp_topk(chosen)
        mask = self.allowed(chosen, positions, k_pos)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).flatten(2))


def build(cfg: Config) -> CausalLM:
    """The model for a DeepSeek-V3.2-style config.json: V3's layers with indexer-selected sparse MLA."""
    args = Args.from_config(cfg)
    rotary, scale = args.mla.rotary(), args.mla.softmax_scale()
    index_rotary = Rotary(args.mla.rope, args.mla.rope_params, interleaved=False)
    return deepseek.decoder(cfg, args,
                            lambda hooks, prefix: SparseMLA(args, rotary, scale, index_rotary, hooks, prefix))


def rules(cfg: Config) -> list[Rule]:
    """V3's names (the indexer's `self_attn.indexer.*` map through the generic attention rule); MTP skipped."""
    return deepseek.rules(cfg)
