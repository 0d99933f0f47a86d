"""Qwen2-MoE and Qwen3-MoE: softmax top-k MoE layers (Qwen2: plus a sigmoid-gated shared expert) among dense ones."""

from __future__ import annotations

from ..config import Config
from ..hooks import HookRegistry
from ..routing import RouterSpec
from .base import CausalLM, DecoderLayer, Rule, hf_rules, layer_windows
from .layers import DenseFFN, activation, gqa
from .moe import MoE


def num_experts(cfg: Config) -> int:
    """Routed experts per MoE layer; transformers may save the count as num_local_experts."""
    return cfg.int("num_experts", cfg.get("num_local_experts", 0), min=0)


def is_sparse(cfg: Config, i: int) -> bool:
    """Whether layer i is an MoE layer: not listed in mlp_only_layers and on the decoder_sparse_step grid."""
    step = cfg.int("decoder_sparse_step", 1)
    return num_experts(cfg) > 0 and i not in cfg.get("mlp_only_layers", []) and (i + 1) % step == 0


def default_layer_types(cfg: Config, n_layers: int) -> list[str]:
    """Without `layer_types`: Qwen3-MoE slides every layer when use_sliding_window is set; Qwen2-MoE slides
    the even layers below max_window_layers, as transformers derives it for such configs."""
    if not cfg.get("use_sliding_window"):
        return ["full_attention"] * n_layers
    if cfg.get("model_type") == "qwen3_moe":
        return ["sliding_attention"] * n_layers
    below = cfg.int("max_window_layers", n_layers, min=0)
    return ["sliding_attention" if i % 2 == 0 and i < below else "full_attention" for i in range(n_layers)]


def build(cfg: Config) -> CausalLM:
    """Qwen2-MoE or Qwen3-MoE (per model_type) with empty weights."""
    hooks = HookRegistry()
    qwen3 = cfg.get("model_type") == "qwen3_moe"
    hidden = cfg.int("hidden_size")
    eps = cfg.float("rms_norm_eps", 1e-6)
    n_layers = cfg.int("num_hidden_layers")
    window = layer_windows(cfg, default_layer_types(cfg, n_layers))
    act = activation(cfg)
    bias = bool(cfg.get("attention_bias", False))
    if qwen3:
        attn_args = dict(qkv_bias=bias, o_bias=bias, qk_norm="head")
    else:
        attn_args = dict(qkv_bias=bool(cfg.get("qkv_bias", True)))  # Qwen2-MoE configs predating the field have bias

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, eps=eps, window=window[i], **attn_args)
        if is_sparse(cfg, i):
            spec = RouterSpec(num_experts(cfg), cfg.int("num_experts_per_tok"), score="softmax",
                              renormalize=bool(cfg.get("norm_topk_prob", False)))
            shared = None if qwen3 else cfg.int("shared_expert_intermediate_size", 0, min=0) or None
            ffn = MoE(hidden, spec, cfg.int("moe_intermediate_size"), hooks, p, act=act,
                      shared_inter=shared, shared_gate=shared is not None)
        else:
            ffn = DenseFFN(hidden, cfg.int("intermediate_size"), act, hooks, p)
        return DecoderLayer(attn, ffn, hidden, eps, hooks, p)

    return CausalLM(cfg, hooks, ((i, layer(i)) for i in range(n_layers)), eps=eps)


def rules(cfg: Config) -> list[Rule]:
    """HF tensor names (per-expert or fused experts, Qwen2's shared_expert and shared_expert_gate)."""
    return hf_rules()
