"""Multi-head Latent Attention (DeepSeek-V2/V3, reused by V3.2): low-rank queries, a compressed KV latent
and one rope key shared by all heads.

Attribute names follow the checkpoint's `self_attn.*` names so the generic HF rules map them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config
from .layers import Linear, RMSNorm, Rotary, attend, project, remember, yarn_mscale

LATENT_EPS = 1e-6  # the q/kv latent norms use their default eps, not the config's rms_norm_eps


@dataclass(frozen=True)
class MLAArgs:
    """MLA's config.json fields (the hidden size comes with the family's `ModelArgs`)."""

    heads: int
    nope: int  # per-head query/key channels without rope (qk_nope_head_dim)
    rope: int  # rope channels of each query head and of the one shared key (qk_rope_head_dim)
    v_dim: int  # v_head_dim
    kv_rank: int  # width of the compressed KV latent (kv_lora_rank)
    q_rank: int | None  # width of the q latent (q_lora_rank); None: queries projected directly
    bias: bool  # attention_bias, on q_a, kv_a and the output projection
    rope_params: dict[str, Any]  # `Config.rope()`
    interleaved: bool  # rope channels rotated in adjacent pairs (DeepSeek's layout), else as two halves

    @classmethod
    def from_config(cls, cfg: Config, interleaved: bool) -> MLAArgs:
        return cls(heads=cfg.int("num_attention_heads"), nope=cfg.int("qk_nope_head_dim"),
                   rope=cfg.int("qk_rope_head_dim"), v_dim=cfg.int("v_head_dim"), kv_rank=cfg.int("kv_lora_rank"),
                   q_rank=cfg.int("q_lora_rank") if "q_lora_rank" in cfg else None,
                   bias=bool(cfg.get("attention_bias", False)), rope_params=cfg.rope(), interleaved=interleaved)

    def rotary(self) -> Rotary:
        """RoPE over the `rope` channels, shared by every layer: adjacent pairs, or halves (rotate-half)."""
        return Rotary(self.rope, self.rope_params, interleaved=self.interleaved)

    def softmax_scale(self) -> float:
        """(nope + rope)^-0.5, times mscale^2 when a scaled rope sets `mscale_all_dim` (long-context YaRN)."""
        scale = (self.nope + self.rope) ** -0.5
        p = self.rope_params
        if p["rope_type"] != "default" and p.get("mscale_all_dim"):
            m = yarn_mscale(float(p["factor"]), float(p["mscale_all_dim"]))
            scale *= m * m
        return scale


class MLA(nn.Module):
    """q = q_b(norm(q_a x)) (or q_proj x); kv_a x = latent | rope key; kv_b(norm(latent)) = per-head k_nope | v."""

    def __init__(self, hidden: int, args: MLAArgs, rotary: Rotary, scale: float):
        super().__init__()
        self.heads, self.nope, self.rope = args.heads, args.nope, args.rope
        self.v_dim, self.kv_rank = args.v_dim, args.kv_rank
        self.rotary, self.scale = rotary, scale
        q_out = self.heads * (self.nope + self.rope)
        if args.q_rank is not None:
            self.q_a_proj = Linear(hidden, args.q_rank, bias=args.bias)
            self.q_a_layernorm = RMSNorm(args.q_rank, LATENT_EPS)
            self.q_b_proj = Linear(args.q_rank, q_out, bias=False)
        else:
            self.q_proj = Linear(hidden, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_rank + self.rope, bias=args.bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_EPS)
        self.kv_b_proj = Linear(self.kv_rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.heads * self.v_dim, hidden, bias=args.bias)

    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normed q latent (q-LoRA; x itself when queries are projected directly) and kv_a's output x -> latent
        | rope key, the two projections of x in one pass where they stream (`layers.project`)."""
        if not hasattr(self, "q_b_proj"):
            return x, self.kv_a_proj_with_mqa(x)
        q_a, kv_a = project(x, self.q_a_proj, self.kv_a_proj_with_mqa)
        return self.q_a_layernorm(q_a), kv_a

    def qkv(self, q_latent: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, state: dict | None,
            **extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [B,H,T,D] and k, v [B,H,S,*] over every visible key (from `latents`), the keys' positions [S], and any
        `extra` per-token tensors kept in the state beside the latent (in order)."""
        B, T, _ = kv_a.shape
        q = (self.q_b_proj if hasattr(self, "q_b_proj") else self.q_proj)(q_latent)
        q_nope, q_rope = q.view(B, T, self.heads, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        latent, k_rope = kv_a.split([self.kv_rank, self.rope], dim=-1)
        cos, sin = self.rotary.cos_sin(positions, kv_a.dtype)
        q_rope = self.rotary.apply(q_rope, cos, sin)
        k_rope = self.rotary.apply(k_rope[:, None], cos, sin)
        # the state keeps only the normed latent and the shared rope key per token (plus `extra`)
        k_pos, latent, k_rope, *kept = remember(state, None, positions, latent=self.kv_a_layernorm(latent)[:, None],
                                                k_rope=k_rope, **extra)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, self.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, self.heads, -1, -1)), dim=-1)
        return q, k, v, k_pos, *kept

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        q, k, v, k_pos = self.qkv(*self.latents(x), positions, state)
        out = attend(q, k, v, positions, k_pos, self.scale)
        return self.o_proj(out.transpose(1, 2).flatten(2))
