"""GPT-OSS: biased GQA attention with per-head sinks, alternating sliding/full layers, YaRN rope, and a
top-k-then-softmax MoE whose experts apply a clamped SwiGLU with biases. As published, the experts are MXFP4
(`mlp.experts.{gate_up,down}_proj_{blocks,scales}`, docs/references.md "Quantised formats")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..hooks import HookRegistry
from ..routing import RouterSpec
from .base import LAYER_TYPES, CausalLM, DecoderLayer, ModelArgs, Rule, hf_rules, layer_windows
from .layers import gqa
from .moe import MoE


@dataclass(frozen=True, kw_only=True)
class Args(ModelArgs):
    """GPT-OSS fields (attention shapes and rope are read by `gqa`)."""

    windows: tuple[int | None, ...]  # sliding window per layer, None = full attention
    bias: bool  # attention_bias, on the q/k/v and output projections
    router: RouterSpec
    inter: int  # expert width (intermediate_size)
    limit: float  # swiglu_limit: expert gate clamped above, up both sides
    alpha: float  # swiglu_alpha: out = (up + 1) * gate * sigmoid(alpha * gate)

    @classmethod
    def from_config(cls, cfg: Config) -> Args:
        base = ModelArgs.common(cfg, eps=1e-5)
        windows = layer_windows(cfg, [LAYER_TYPES[i % 2] for i in range(base.layers)])  # even layers slide
        router = RouterSpec(cfg.int("num_local_experts"), cfg.int("num_experts_per_tok"), score="identity",
                            weight_softmax=True, logit_bias=True)
        return cls(**vars(base), windows=windows, bias=bool(cfg.get("attention_bias", True)), router=router,
                   inter=cfg.int("intermediate_size"), limit=cfg.float("swiglu_limit", 7.0),
                   alpha=cfg.float("swiglu_alpha", 1.702))


def build(cfg: Config) -> CausalLM:
    """GPT-OSS with empty weights."""
    args = Args.from_config(cfg)
    hooks = HookRegistry()

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        attn = gqa(cfg, qkv_bias=args.bias, o_bias=args.bias, eps=args.eps, window=args.windows[i], sinks=True)
        ffn = MoE(args.hidden, args.router, args.inter, hooks, p, expert_bias=True, limit=args.limit,
                  alpha=args.alpha)
        return DecoderLayer(attn, ffn, args.hidden, args.eps, hooks, p)

    return CausalLM(cfg, args, hooks, ((i, layer(i)) for i in range(args.layers)))


def split_interleaved(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gate_up [E, H, 2I] (gate even, up odd on the last axis) into our gate, up [E, I, H]."""
    return t[..., 0::2].transpose(-1, -2), t[..., 1::2].transpose(-1, -2)


def split_interleaved_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused MXFP4 gate_up codes [E, 2I, H / 2] or their scales [E, 2I, H / 32] (gate even, up odd rows) into
    gate and up: whole rows, so codes and scales split alike."""
    return t[..., 0::2, :], t[..., 1::2, :]


def split_interleaved_bias(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gate_up bias [E, 2I] (same interleave) into gate and up biases [E, I]."""
    return t[..., 0::2], t[..., 1::2]


def transpose_down(t: torch.Tensor) -> tuple[torch.Tensor]:
    """down_proj stored [E, I, H] (right-multiplied) into our [E, H, I]."""
    return (t.transpose(-1, -2),)


def rules(cfg: Config) -> list[Rule]:
    """GPT-OSS expert and router names first (float or MXFP4 experts), then the HF-style rest (attention incl. sinks,
    norms, embeddings)."""
    L, X = r"model\.layers\.(\d+)\.", r"layers.\1.ffn."
    return [
        Rule(L + r"mlp\.router\.(weight|bias)", (X + r"router.\2",)),
        Rule(L + r"mlp\.experts\.gate_up_proj", (X + "experts.gate_proj", X + "experts.up_proj"), split_interleaved),
        Rule(L + r"mlp\.experts\.gate_up_proj_bias", (X + "experts.gate_bias", X + "experts.up_bias"),
             split_interleaved_bias),
        Rule(L + r"mlp\.experts\.down_proj", (X + "experts.down_proj",), transpose_down),
        Rule(L + r"mlp\.experts\.down_proj_bias", (X + "experts.down_bias",)),
        Rule(L + r"mlp\.experts\.gate_up_proj_blocks", (X + "experts.gate_proj", X + "experts.up_proj"),
             split_interleaved_rows),
        Rule(L + r"mlp\.experts\.down_proj_blocks", (X + "experts.down_proj",)),  # already [E, H, I]
        *hf_rules(),
    ]
