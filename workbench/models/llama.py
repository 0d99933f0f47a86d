"""Dense Llama and Qwen2 decoders (the DeepSeek-R1-Distill bases): baselines with the same hooks."""

from __future__ import annotations

from ..config import Config
from ..hooks import HookRegistry
from .base import CausalLM, DecoderLayer, hf_rules
from .blocks import Attention, DenseFFN, Rotary, activation


def build(cfg: Config) -> CausalLM:
    hooks = HookRegistry()
    hidden, heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
    kv_heads = cfg.int("num_key_value_heads", heads)
    head_dim = cfg.int("head_dim", hidden // heads)
    eps = cfg.float("rms_norm_eps", 1e-6)
    rotary = Rotary(head_dim, cfg.rope())
    qwen = cfg.get("model_type") == "qwen2"
    n_layers = cfg.int("num_hidden_layers")
    window = cfg.int("sliding_window") if qwen and cfg.get("use_sliding_window") else None
    max_window_layers = cfg.int("max_window_layers", n_layers, min=0)

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = Attention(hidden, heads, kv_heads, head_dim, rotary, eps=eps,
                         qkv_bias=qwen or bool(cfg.get("attention_bias")), o_bias=bool(cfg.get("attention_bias")),
                         window=window if window and i >= max_window_layers else None)
        ffn = DenseFFN(hidden, cfg.int("intermediate_size"), activation(cfg), hooks, p)
        return DecoderLayer(attn, ffn, hidden, eps, hooks, p)

    return CausalLM(cfg, hooks, ((i, layer(i)) for i in range(n_layers)), eps=eps)


def rules(cfg: Config):
    return hf_rules()
