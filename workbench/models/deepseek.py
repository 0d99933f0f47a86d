"""DeepSeek-V2 / V3 (V3.1, R1) and Kimi-K2: MLA attention, dense first layers, then shared + routed experts.

Routing (docs/references.md, "Routing, per family"): V3 `noaux_tc` selects on sigmoid + correction bias within
the best groups (group score = sum of its top-2); V2 softmax `greedy` or `group_limited_greedy` (group score =
max).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import Config
from ..errors import CheckpointError
from ..hooks import HookRegistry
from ..routing import RouterSpec
from .base import CausalLM, DecoderLayer, ModelArgs, Rule, hf_rules
from .layers import DenseFFN, activation
from .mla import MLA, MLAArgs
from .moe import MoE

# model_type -> (topk_method, norm_topk_prob, routed_scaling_factor, first_k_dense_replace) when config.json
# leaves them out, as the reference config classes default them
DEFAULTS = {
    "deepseek_v2": ("greedy", False, 1.0, 0),
    "deepseek_v3": ("noaux_tc", True, 2.5, 3),
    "kimi_k2": ("noaux_tc", True, 2.5, 3),
    "deepseek_v32": ("noaux_tc", True, 2.5, 3),
}
# model types whose `rope_interleave` (default true) says whether MLA's rope channels pair up adjacent or as two
# halves, as transformers' DeepseekV3 reads it; V2 and V3.2 always pair adjacent channels
ROPE_INTERLEAVE = ("deepseek_v3", "kimi_k2")


@dataclass(frozen=True, kw_only=True)
class Args(ModelArgs):
    """DeepSeek-V2/V3 fields."""

    mla: MLAArgs
    router: RouterSpec
    moe: tuple[bool, ...]  # per layer: MoE (True) or dense MLP
    inter: int | None  # dense MLP width (intermediate_size); None when every layer is MoE
    moe_inter: int  # routed expert width (moe_intermediate_size)
    shared_inter: int  # the shared experts as one MLP: n_shared_experts * moe_intermediate_size (0: none)
    act: Callable

    @classmethod
    def from_config(cls, cfg: Config) -> Args:
        base = ModelArgs.common(cfg, eps=1e-6)
        moe, moe_inter = tuple(moe_layers(cfg)), cfg.int("moe_intermediate_size")
        interleaved = cfg.get("model_type") not in ROPE_INTERLEAVE or _flag(cfg, "rope_interleave", True)
        return cls(**vars(base), mla=MLAArgs.from_config(cfg, interleaved), router=router_spec(cfg), moe=moe,
                   inter=None if all(moe) else cfg.int("intermediate_size"), moe_inter=moe_inter,
                   shared_inter=cfg.int("n_shared_experts", 0, min=0) * moe_inter, act=activation(cfg))


def _flag(cfg: Config, key: str, default: bool) -> bool:
    """A boolean field; anything else is a config error."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"field {key!r} must be true or false, got {value!r}", file=cfg.file)
    return value


def router_spec(cfg: Config) -> RouterSpec:
    """The routing rule config.json asks for, checked against the expert count."""
    method, norm, scaling, _ = DEFAULTS[cfg.get("model_type")]
    method = cfg.choice("topk_method", ("greedy", "group_limited_greedy", "noaux_tc"), method)
    score = cfg.choice("scoring_func", ("softmax", "sigmoid"), "sigmoid" if method == "noaux_tc" else "softmax")
    experts, top_k = cfg.int("n_routed_experts"), cfg.int("num_experts_per_tok")
    groups = topk_groups = 1
    if method != "greedy":
        groups = cfg.int("n_group", 1)
        topk_groups = cfg.int("topk_group", groups)
        per_group = experts // groups
        if experts % groups or topk_groups > groups or (method == "noaux_tc" and groups > 1 and per_group < 2):
            raise CheckpointError(f"n_group={groups}, topk_group={topk_groups} do not fit {experts} experts",
                                  file=cfg.file)
        if top_k > topk_groups * per_group:
            raise CheckpointError(f"num_experts_per_tok={top_k} exceeds the experts of {topk_groups} groups",
                                  file=cfg.file)
    if top_k > experts:
        raise CheckpointError(f"num_experts_per_tok={top_k} exceeds n_routed_experts={experts}", file=cfg.file)
    return RouterSpec(
        experts, top_k, score=score, correction_bias=method == "noaux_tc", groups=groups, topk_groups=topk_groups,
        group_score="top2sum" if method == "noaux_tc" else "max",
        renormalize=_flag(cfg, "norm_topk_prob", norm), norm_eps=1e-20,
        scaling=cfg.float("routed_scaling_factor", scaling),
    )


def moe_layers(cfg: Config) -> list[bool]:
    """Per layer: MoE (True) or dense, from `mlp_layer_types` or `first_k_dense_replace` / `moe_layer_freq`."""
    n = cfg.int("num_hidden_layers")
    types = cfg.get("mlp_layer_types")
    if types is not None:
        if len(types) < n or any(t not in ("dense", "sparse") for t in types[:n]):
            raise CheckpointError(f"mlp_layer_types must list {n} of dense, sparse", file=cfg.file)
        return [t == "sparse" for t in types[:n]]
    first = cfg.int("first_k_dense_replace", DEFAULTS[cfg.get("model_type")][3], min=0)
    freq = cfg.int("moe_layer_freq", 1)
    return [i >= first and i % freq == 0 for i in range(n)]


def build(cfg: Config) -> CausalLM:
    """The model for a DeepSeek-V2/V3-style config.json."""
    args = Args.from_config(cfg)
    rotary, scale = args.mla.rotary(), args.mla.softmax_scale()
    return decoder(cfg, args, lambda hooks, prefix: MLA(args.hidden, args.mla, rotary, scale))


def decoder(cfg: Config, args: Args, attention: Callable[[HookRegistry, str], nn.Module]) -> CausalLM:
    """V2/V3's layers with `attention(hooks, prefix)` (MLA, or V3.2's sparse variant) in each."""
    hooks = HookRegistry()

    def layer(i: int) -> DecoderLayer:
        p = f"layers.{i}"
        if args.moe[i]:
            ffn = MoE(args.hidden, args.router, args.moe_inter, hooks, p, act=args.act,
                      shared_inter=args.shared_inter or None)
        else:
            ffn = DenseFFN(args.hidden, args.inter, args.act, hooks, p)
        return DecoderLayer(attention(hooks, p), ffn, args.hidden, args.eps, hooks, p)

    return CausalLM(cfg, args, hooks, ((i, layer(i)) for i in range(args.layers)))


def _at_least(n: int) -> str:
    """A regex matching the decimal integers >= n (no leading zeros)."""
    s = str(n)
    alts = [rf"[1-9]\d{{{len(s)},}}", s]
    for i, d in enumerate(s):
        if d != "9":
            alts.append(rf"{s[:i]}[{int(d) + 1}-9]\d{{{len(s) - i - 1}}}")
    return "(?:" + "|".join(alts) + ")"


def rules(cfg: Config) -> list[Rule]:
    """HF names, plus the multi-token-prediction layers (index >= num_hidden_layers), skipped."""
    mtp = Rule(rf"model\.layers\.{_at_least(cfg.int('num_hidden_layers'))}\..*", ())
    return [mtp, *hf_rules()]
