"""Dense Llama and Qwen2 decoders (the DeepSeek-R1-Distill bases): baselines with the same hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from ..hooks import HookRegistry
from .base import CausalLM, DecoderLayer, ModelArgs, hf_rules, layer_windows
from .layers import DenseFFN, activation, gqa


@dataclass(frozen=True, kw_only=True)
class Args(ModelArgs):
    """Llama / Qwen2 fields (attention shapes and rope are read by `gqa`)."""

    inter: int  # MLP width (intermediate_size)
    act: Callable
    qkv_bias: bool
    o_bias: bool
    windows: tuple[int | None, ...]  # sliding window per layer, None = full attention

    @classmethod
    def from_config(cls, cfg: Config) -> Args:
        base = ModelArgs.common(cfg, eps=1e-6)
        qwen = cfg.get("model_type") == "qwen2"
        bias = bool(cfg.get("attention_bias", False))
        below = cfg.int("max_window_layers", base.layers, min=0)
        slides = qwen and bool(cfg.get("use_sliding_window"))
        windows = layer_windows(cfg, ["sliding_attention" if slides and i >= below else "full_attention"
                                      for i in range(base.layers)])
        return cls(**vars(base), inter=cfg.int("intermediate_size"), act=activation(cfg), qkv_bias=qwen or bias,
                   o_bias=bias, windows=windows)


def build(cfg: Config) -> CausalLM:
    args = Args.from_config(cfg)
    hooks = HookRegistry()

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, eps=args.eps, qkv_bias=args.qkv_bias, o_bias=args.o_bias, window=args.windows[i])
        ffn = DenseFFN(args.hidden, args.inter, args.act, hooks, p)
        return DecoderLayer(attn, ffn, args.hidden, args.eps, hooks, p)

    return CausalLM(cfg, args, hooks, ((i, layer(i)) for i in range(args.layers)))


def rules(cfg: Config):
    return hf_rules()
