"""OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv, softmax top-k MoE in every layer."""

from __future__ import annotations

from ..config import Config
from ..hooks import HookRegistry
from ..routing import RouterSpec
from .base import CausalLM, DecoderLayer, Rule, hf_rules
from .layers import activation, gqa
from .moe import MoE


def build(cfg: Config) -> CausalLM:
    """OLMoE with empty weights."""
    hooks = HookRegistry()
    hidden = cfg.int("hidden_size")
    eps = cfg.float("rms_norm_eps", 1e-5)
    bias = bool(cfg.get("attention_bias", False))
    clip = cfg.float("clip_qkv") if "clip_qkv" in cfg else None
    experts = cfg.int("num_experts", cfg.get("num_local_experts"))  # transformers may save num_local_experts
    spec = RouterSpec(experts, cfg.int("num_experts_per_tok"), score="softmax",
                      renormalize=bool(cfg.get("norm_topk_prob", False)))

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, qkv_bias=bias, o_bias=bias, qk_norm="full", eps=eps, clip=clip)
        ffn = MoE(hidden, spec, cfg.int("intermediate_size"), hooks, p, act=activation(cfg))
        return DecoderLayer(attn, ffn, hidden, eps, hooks, p)

    return CausalLM(cfg, hooks, ((i, layer(i)) for i in range(cfg.int("num_hidden_layers"))), eps=eps)


def rules(cfg: Config) -> list[Rule]:
    """HF tensor names (per-expert or fused experts)."""
    return hf_rules()
