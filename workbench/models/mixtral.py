"""Mixtral: GQA attention (optional sliding window) and a softmax top-k MoE with renormalised weights."""

from __future__ import annotations

from ..config import Config
from ..hooks import HookRegistry
from ..routing import RouterSpec
from .base import CausalLM, DecoderLayer, hf_rules, layer_windows
from .layers import activation, gqa
from .moe import MoE


def build(cfg: Config) -> CausalLM:
    hooks = HookRegistry()
    hidden = cfg.int("hidden_size")
    eps = cfg.float("rms_norm_eps", 1e-5)
    n_layers = cfg.int("num_hidden_layers")
    window = layer_windows(cfg, [("sliding_attention" if "sliding_window" in cfg else "full_attention")] * n_layers)
    spec = RouterSpec(cfg.int("num_local_experts"), cfg.int("num_experts_per_tok"), score="softmax", renormalize=True)

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, eps=eps, window=window[i])
        ffn = MoE(hidden, spec, cfg.int("intermediate_size"), hooks, p, act=activation(cfg))
        return DecoderLayer(attn, ffn, hidden, eps, hooks, p)

    return CausalLM(cfg, hooks, ((i, layer(i)) for i in range(n_layers)), eps=eps)


def rules(cfg: Config):
    return hf_rules(moe="block_sparse_moe", experts=("w1", "w3", "w2"))
