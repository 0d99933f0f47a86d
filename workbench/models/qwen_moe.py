"""Qwen2-MoE and Qwen3-MoE: softmax top-k MoE layers (Qwen2: plus a sigmoid-gated shared expert) among dense ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from ..hooks import HookRegistry
from ..routing import RouterSpec
from .base import CausalLM, DecoderLayer, ModelArgs, Rule, hf_rules, layer_windows
from .layers import DenseFFN, activation, gqa
from .moe import MoE


@dataclass(frozen=True, kw_only=True)
class Args(ModelArgs):
    """Qwen2-MoE / Qwen3-MoE fields (attention shapes and rope are read by `gqa`)."""

    qkv_bias: bool
    o_bias: bool
    qk_norm: str | None  # "head": per-head q/k RMSNorm (Qwen3-MoE)
    windows: tuple[int | None, ...]  # sliding window per layer, None = full attention
    act: Callable
    sparse: tuple[bool, ...]  # per layer: MoE (True) or dense MLP
    inter: int | None  # dense MLP width (intermediate_size); None when every layer is MoE
    router: RouterSpec | None  # None when no layer is MoE
    moe_inter: int | None  # expert width (moe_intermediate_size)
    shared_inter: int | None  # Qwen2-MoE's gated shared expert width; None without one

    @classmethod
    def from_config(cls, cfg: Config) -> Args:
        base = ModelArgs.common(cfg, eps=1e-6)
        n = base.layers
        qwen3 = cfg.get("model_type") == "qwen3_moe"
        bias = bool(cfg.get("attention_bias", False))
        # Qwen2-MoE has q/k/v bias and no output bias; its configs predating `qkv_bias` have it
        qkv_bias, o_bias = (bias, bias) if qwen3 else (bool(cfg.get("qkv_bias", True)), False)
        # without `layer_types`: Qwen3-MoE slides every layer when use_sliding_window is set; Qwen2-MoE the even
        # layers below max_window_layers, as transformers derives it for such configs
        slides = bool(cfg.get("use_sliding_window"))
        below = cfg.int("max_window_layers", n, min=0) if slides and not qwen3 else n
        windows = layer_windows(cfg, ["sliding_attention" if slides and (qwen3 or i % 2 == 0 and i < below)
                                      else "full_attention" for i in range(n)])
        # transformers may save the expert count as num_local_experts
        experts = cfg.int("num_experts", cfg.get("num_local_experts", 0), min=0)
        step = cfg.int("decoder_sparse_step", 1)
        dense = cfg.get("mlp_only_layers", [])
        sparse = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(n))
        router = moe_inter = shared = None
        if any(sparse):
            router = RouterSpec(experts, cfg.int("num_experts_per_tok"), score="softmax",
                                renormalize=bool(cfg.get("norm_topk_prob", False)))
            moe_inter = cfg.int("moe_intermediate_size")
            shared = None if qwen3 else cfg.int("shared_expert_intermediate_size", 0, min=0) or None
        return cls(**vars(base), qkv_bias=qkv_bias, o_bias=o_bias, qk_norm="head" if qwen3 else None, windows=windows,
                   act=activation(cfg), sparse=sparse, inter=None if all(sparse) else cfg.int("intermediate_size"),
                   router=router, moe_inter=moe_inter, shared_inter=shared)


def build(cfg: Config) -> CausalLM:
    """Qwen2-MoE or Qwen3-MoE (per model_type) with empty weights."""
    args = Args.from_config(cfg)
    hooks = HookRegistry()

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, eps=args.eps, window=args.windows[i], qkv_bias=args.qkv_bias, o_bias=args.o_bias,
                   qk_norm=args.qk_norm)
        if args.sparse[i]:
            ffn = MoE(args.hidden, args.router, args.moe_inter, hooks, p, act=args.act,
                      shared_inter=args.shared_inter, shared_gate=args.shared_inter is not None)
        else:
            ffn = DenseFFN(args.hidden, args.inter, args.act, hooks, p)
        return DecoderLayer(attn, ffn, args.hidden, args.eps, hooks, p)

    return CausalLM(cfg, args, hooks, ((i, layer(i)) for i in range(args.layers)))


def rules(cfg: Config) -> list[Rule]:
    """HF tensor names (per-expert or fused experts, Qwen2's shared_expert and shared_expert_gate)."""
    return hf_rules()
