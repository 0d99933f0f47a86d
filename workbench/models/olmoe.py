"""OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv, softmax top-k MoE in every layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import Config
from ..hooks import HookRegistry
from .base import CausalLM, DecoderLayer, Rule, hf_rules
from .blocks import Attention, MoE, Rotary, RouterSpec, activation


class ClippedAttention(Attention):
    """Attention whose normed q, k and raw v projections are clamped to [-clip, clip] (OLMoE's clip_qkv)."""

    def __init__(self, *args: Any, clip: float, **kwargs: Any):
        super().__init__(*args, qk_norm="full", **kwargs)
        self.clip = clip
        for module in (self.q_norm, self.k_norm, self.v_proj):
            module.register_forward_hook(self._clamp)

    def _clamp(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook replacing a projection's output with its clamped value."""
        return out.clamp(-self.clip, self.clip)


def build(cfg: Config) -> CausalLM:
    """OLMoE with empty weights."""
    hooks = HookRegistry()
    hidden, heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
    kv_heads = cfg.int("num_key_value_heads", heads)
    head_dim = cfg.int("head_dim", hidden // heads)
    eps = cfg.float("rms_norm_eps", 1e-5)
    rotary = Rotary(head_dim, cfg.rope())
    bias = bool(cfg.get("attention_bias", False))
    clip = cfg.float("clip_qkv") if "clip_qkv" in cfg else None
    spec = RouterSpec(cfg.int("num_experts", cfg.get("num_local_experts")), cfg.int("num_experts_per_tok"), score="softmax",
                      renormalize=bool(cfg.get("norm_topk_prob", False)))

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        args = (hidden, heads, kv_heads, head_dim, rotary)
        if clip is None:
            attn = Attention(*args, qkv_bias=bias, o_bias=bias, qk_norm="full", eps=eps)
        else:
            attn = ClippedAttention(*args, qkv_bias=bias, o_bias=bias, eps=eps, clip=clip)
        ffn = MoE(hidden, spec, cfg.int("intermediate_size"), hooks, p, act=activation(cfg))
        return DecoderLayer(attn, ffn, hidden, eps, hooks, p)

    return CausalLM(cfg, hooks, ((i, layer(i)) for i in range(cfg.int("num_hidden_layers"))), eps=eps)


def rules(cfg: Config) -> list[Rule]:
    """HF tensor names (per-expert or fused experts)."""
    return hf_rules()
