"""Mixtral: GQA attention (optional sliding window) and a softmax top-k MoE with renormalised weights."""

from __future__ import annotations

from ..config import Config
from ..hooks import HookRegistry
from .base import CausalLM, DecoderLayer, hf_rules
from .blocks import Attention, MoE, Rotary, RouterSpec, activation


def build(cfg: Config) -> CausalLM:
    hooks = HookRegistry()
    hidden, heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
    kv_heads = cfg.int("num_key_value_heads", heads)
    head_dim = cfg.int("head_dim", hidden // heads)
    eps = cfg.float("rms_norm_eps", 1e-5)
    rotary = Rotary(head_dim, cfg.rope())
    window = cfg.int("sliding_window") if "sliding_window" in cfg else None
    spec = RouterSpec(cfg.int("num_local_experts"), cfg.int("num_experts_per_tok"), score="softmax", renormalize=True)

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = Attention(hidden, heads, kv_heads, head_dim, rotary, eps=eps, window=window)
        ffn = MoE(hidden, spec, cfg.int("intermediate_size"), hooks, p, act=activation(cfg))
        return DecoderLayer(attn, ffn, hidden, eps, hooks, p)

    return CausalLM(cfg, hooks, ((i, layer(i)) for i in range(cfg.int("num_hidden_layers"))), eps=eps)


def rules(cfg: Config):
    return hf_rules(moe="block_sparse_moe", experts=("w1", "w3", "w2"))
