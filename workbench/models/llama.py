"""Dense Llama and Qwen2 decoders (the DeepSeek-R1-Distill bases): baselines with the same hooks."""

from __future__ import annotations

from ..config import Config
from ..hooks import HookRegistry
from .base import CausalLM, DecoderLayer, hf_rules, layer_windows
from .layers import DenseFFN, activation, gqa


def build(cfg: Config) -> CausalLM:
    hooks = HookRegistry()
    hidden = cfg.int("hidden_size")
    eps = cfg.float("rms_norm_eps", 1e-6)
    qwen = cfg.get("model_type") == "qwen2"
    bias = bool(cfg.get("attention_bias", False))
    n_layers = cfg.int("num_hidden_layers")
    below = cfg.int("max_window_layers", n_layers, min=0)
    slides = qwen and bool(cfg.get("use_sliding_window"))
    window = layer_windows(cfg, ["sliding_attention" if slides and i >= below else "full_attention"
                                 for i in range(n_layers)])

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, eps=eps, qkv_bias=qwen or bias, o_bias=bias, window=window[i])
        ffn = DenseFFN(hidden, cfg.int("intermediate_size"), activation(cfg), hooks, p)
        return DecoderLayer(attn, ffn, hidden, eps, hooks, p)

    return CausalLM(cfg, hooks, ((i, layer(i)) for i in range(n_layers)), eps=eps)


def rules(cfg: Config):
    return hf_rules()
