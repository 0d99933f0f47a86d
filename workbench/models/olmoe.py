"""OLMoE: q/k RMSNorm over the whole projection, optional clip_qkv, softmax top-k MoE in every layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from ..hooks import HookRegistry
from ..routing import RouterSpec
from .base import CausalLM, DecoderLayer, ModelArgs, Rule, hf_rules
from .layers import activation, gqa
from .moe import MoE


@dataclass(frozen=True, kw_only=True)
class Args(ModelArgs):
    """OLMoE fields (attention shapes and rope are read by `gqa`)."""

    router: RouterSpec
    inter: int  # expert width (intermediate_size)
    act: Callable
    bias: bool  # attention_bias, on the q/k/v and output projections
    clip: float | None  # clip_qkv: q, k, v clamped to [-clip, clip]

    @classmethod
    def from_config(cls, cfg: Config) -> Args:
        base = ModelArgs.common(cfg, eps=1e-5)
        bias = bool(cfg.get("attention_bias", False))
        clip = cfg.float("clip_qkv") if "clip_qkv" in cfg else None
        experts = cfg.int("num_experts", cfg.get("num_local_experts"))  # transformers may save num_local_experts
        router = RouterSpec(experts, cfg.int("num_experts_per_tok"), score="softmax",
                            renormalize=bool(cfg.get("norm_topk_prob", False)))
        return cls(**vars(base), router=router, inter=cfg.int("intermediate_size"), act=activation(cfg), bias=bias,
                   clip=clip)


def build(cfg: Config) -> CausalLM:
    """OLMoE with empty weights."""
    args = Args.from_config(cfg)
    hooks = HookRegistry()

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, qkv_bias=args.bias, o_bias=args.bias, qk_norm="full", eps=args.eps, clip=args.clip)
        ffn = MoE(args.hidden, args.router, args.inter, hooks, p, act=args.act)
        return DecoderLayer(attn, ffn, args.hidden, args.eps, hooks, p)

    return CausalLM(cfg, args, hooks, ((i, layer(i)) for i in range(args.layers)))


def rules(cfg: Config) -> list[Rule]:
    """HF tensor names (per-expert or fused experts)."""
    return hf_rules()
