"""Mixtral: GQA attention (optional sliding window) and a softmax top-k MoE with renormalised weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config
from ..hooks import HookRegistry
from ..routing import RouterSpec
from .base import CausalLM, DecoderLayer, ModelArgs, hf_rules, layer_windows
from .layers import activation, gqa
from .moe import MoE


@dataclass(frozen=True, kw_only=True)
class Args(ModelArgs):
    """Mixtral fields (attention shapes and rope are read by `gqa`)."""

    router: RouterSpec
    inter: int  # expert width (intermediate_size)
    act: Callable
    windows: tuple[int | None, ...]  # sliding window per layer, None = full attention

    @classmethod
    def from_config(cls, cfg: Config) -> Args:
        base = ModelArgs.common(cfg, eps=1e-5)
        kind = "sliding_attention" if "sliding_window" in cfg else "full_attention"
        windows = layer_windows(cfg, [kind] * base.layers)
        router = RouterSpec(cfg.int("num_local_experts"), cfg.int("num_experts_per_tok"), score="softmax",
                            renormalize=True)
        return cls(**vars(base), router=router, inter=cfg.int("intermediate_size"), act=activation(cfg),
                   windows=windows)


def build(cfg: Config) -> CausalLM:
    args = Args.from_config(cfg)
    hooks = HookRegistry()

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, eps=args.eps, window=args.windows[i])
        ffn = MoE(args.hidden, args.router, args.inter, hooks, p, act=args.act)
        return DecoderLayer(attn, ffn, args.hidden, args.eps, hooks, p)

    return CausalLM(cfg, args, hooks, ((i, layer(i)) for i in range(args.layers)))


def rules(cfg: Config):
    return hf_rules(moe="block_sparse_moe", experts=("w1", "w3", "w2"))
