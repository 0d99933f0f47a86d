"""The decoder skeleton every family shares, and the mapping from checkpoint tensor names to ours."""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import Config
from ..errors import CheckpointError, InputError, NonFiniteError
from ..hooks import HookContext, HookFn, HookRegistry
from .layers import Linear, RMSNorm


LAYER_TYPES = ("sliding_attention", "full_attention")


def layer_windows(cfg: Config, default_types: list[str]) -> tuple[int | None, ...]:
    """Sliding-window size per layer (None = full attention), from `layer_types` or the family's default (one
    type per layer)."""
    n = len(default_types)
    types = cfg.get("layer_types") or default_types
    if len(types) < n or any(t not in LAYER_TYPES for t in types):
        raise CheckpointError(f"layer_types must list {n} of {', '.join(LAYER_TYPES)}", file=cfg.file)
    return tuple(cfg.int("sliding_window") if t == "sliding_attention" else None for t in types[:n])


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """The config.json fields every family reads. Each family extends it as `Args`, built once by
    `Args.from_config(cfg)`, where every field is read, defaulted and checked."""

    vocab: int
    hidden: int
    layers: int
    eps: float  # rms_norm_eps of the block norms and the final norm
    tied: bool  # the output head shares the embedding (tie_word_embeddings)

    @staticmethod
    def common(cfg: Config, eps: float) -> ModelArgs:
        """The shared fields; `eps` is the family's rms_norm_eps when config.json leaves it out."""
        return ModelArgs(vocab=cfg.int("vocab_size"), hidden=cfg.int("hidden_size"),
                         layers=cfg.int("num_hidden_layers"), eps=cfg.float("rms_norm_eps", eps),
                         tied=bool(cfg.get("tie_word_embeddings", False)))


class DecoderLayer(nn.Module):
    """Pre-norm residual layer: x + attn(norm(x)), then + ffn(norm(x)), with residual hooks."""

    def __init__(self, attn: nn.Module, ffn: nn.Module, hidden: int, eps: float, hooks: HookRegistry, prefix: str):
        super().__init__()
        self.hp_pre = hooks.point(f"{prefix}.resid_pre")
        self.attn_norm, self.attn = RMSNorm(hidden, eps), attn
        self.hp_attn = hooks.point(f"{prefix}.attn.out")
        self.hp_mid = hooks.point(f"{prefix}.resid_mid")
        self.ffn_norm, self.ffn = RMSNorm(hidden, eps), ffn
        self.hp_post = hooks.point(f"{prefix}.resid_post")

    def forward(self, x: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor,
                state: dict | None = None) -> torch.Tensor:
        x = self.hp_pre(x)
        x = self.hp_mid(x + self.hp_attn(self.attn(self.attn_norm(x), positions, state)))
        return self.hp_post(x + self.ffn(self.ffn_norm(x), token_ids))


@dataclass
class State:
    """What a chunk-by-chunk forward carries between chunks of one sequence: the next position and each
    layer's attention state (keys/values, windowed for sliding layers; MLA's latent and rope key;
    DeepSeek-V4's pending tokens and pooled entries of its compressors)."""

    offset: int = 0
    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (what a long sequence costs in memory beyond the weights)."""
        return tensor_bytes(self.layers)


def tensor_bytes(d: dict) -> int:
    """Bytes of the tensors in a (nested) dict, e.g. one layer's entry of `State.layers`."""
    return sum(tensor_bytes(v) if isinstance(v, dict) else v.nbytes if isinstance(v, torch.Tensor) else 0
               for v in d.values())


Cache = dict[str, torch.Tensor]  # hook name -> tensor


class CausalLM(nn.Module):
    """A decoder-only language model with named hook points (vocabulary: docs/architecture.md, "Hook points").

    Families build it from their layers; `workbench.load` fills the weights and sets `source`,
    `revision`, `commit`, `config` and `tokenizer`.
    """

    def __init__(self, cfg: Config, args: ModelArgs, hooks: HookRegistry, layers: Iterable[tuple[int, nn.Module]]):
        super().__init__()
        self.config, self._hooks = cfg, hooks
        self.vocab_size = args.vocab
        self.embed = nn.Embedding(args.vocab, args.hidden)
        self.layers = nn.ModuleDict({str(i): layer for i, layer in layers})
        self.norm = RMSNorm(args.hidden, args.eps)
        self.hp_norm_out = hooks.point("final.norm_out")
        self.tied = args.tied
        self.lm_head = Linear(args.hidden, args.vocab, bias=False)
        self.hp_logits = hooks.point("logits")
        hooks.sort()
        self.source: str | None = None
        self.revision: str | None = None
        self.commit: str | None = None
        self.tokenizer: Any = None
        self.index_tables: dict[str, int] = {}  # integer parameter -> exclusive bound of its values
        self.parallel: Any = None  # workbench.distributed.ExpertParallel when loaded expert-parallel
        self.backend = "torch"  # routed experts: "torch" (reference), "grouped" or "triton"; set by `workbench.load`
        self.load_report: dict[str, Any] = {}  # what loading read, set by `workbench.load`

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so."""
        if self.tied:
            self.lm_head.weight = self.embed.weight

    # leaf names of state tensors that only grow, by rows appended along dim 1 (snapshots write just the new rows)
    appended_state: tuple[str, ...] = ()

    @property
    def bounded_state(self) -> bool:
        """Whether the State carried between chunks stays bounded (or only grows by `appended_state` rows), so
        `trace` snapshots it at each commit and resumes from it; False (full attention keeps every key): resume
        replays the committed tokens."""
        return False

    @property
    def hook_names(self) -> list[str]:
        """Every hook point, in the order the forward pass reaches it."""
        return list(self._hooks.points)

    def forward(self, input_ids: torch.Tensor, *, cache: State | None = None, head: bool = True) -> torch.Tensor | None:
        """Logits [B, T, vocab] for token ids [B, T] (or [T]).

        With `cache=State()` the sequence may be fed chunk by chunk: each call continues where the last
        one stopped, and the logits equal those of one whole-sequence call. `head=False` stops after the last
        layer and returns None (no `final.*` or `logits` hook fires): for callers that only read the layers'
        hooks, as `trace` is, the output head of a real vocabulary being the costliest matmul of a chunk.
        """
        input_ids, positions = self._start(input_ids, cache)
        x = self.embed(input_ids)
        for i, layer in self.layers.items():
            x = layer(x, positions, input_ids, None if cache is None else cache.layers.setdefault(i, {}))
        return self._finish(x, cache, head)

    def _start(self, input_ids: Any, cache: State | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked ids [B, T] and their absolute positions [T] (continuing `cache`); tells the hooks both."""
        input_ids = self._check_ids(input_ids)
        start = cache.offset if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        if self.parallel is not None:
            self.parallel.check_forward(self._hooks, input_ids)
        self._hooks.positions, self._hooks.input_ids = positions, input_ids
        return input_ids, positions

    def _finish(self, x: torch.Tensor, cache: State | None, head: bool = True) -> torch.Tensor | None:
        """Final norm and head over the last hidden state [B, T, H] (none without `head`); advances `cache`
        past this chunk."""
        if cache is not None:
            cache.offset += x.shape[1]
        if not head:
            return None
        x = self.hp_norm_out(self.norm(x))
        return self.hp_logits(self.lm_head(x))

    def _check_ids(self, ids: Any) -> torch.Tensor:
        """Token ids as a LongTensor [B, T] on the model's device; anything else raises InputError saying why."""
        if not isinstance(ids, torch.Tensor):
            try:
                ids = torch.as_tensor(ids)
            except (TypeError, ValueError, RuntimeError) as e:
                raise InputError(f"input_ids must be integer token ids [batch, tokens], got {type(ids).__name__} "
                                 f"({e})") from None
        if ids.dim() not in (1, 2) or ids.numel() == 0:
            raise InputError(f"input_ids must be a non-empty [batch, tokens] tensor, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise InputError(f"input_ids must be an integer tensor of token ids, got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            b, t = (ids == bad).nonzero()[0].tolist()
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size}) (batch {b}, token {t})")
        return ids.to(device=self.embed.weight.device, dtype=torch.long)

    def hooks(self, hooks: Mapping[str, HookFn] | Iterable[tuple[str, HookFn]]):
        """Context manager registering `{name_or_glob: fn}`; fn(tensor, ctx) returns a replacement or None."""
        return self._hooks.attached(hooks)

    def check_finite(self, names: Iterable[str] | str = "*"):
        """Context manager: within it a forward raises NonFiniteError at the first hook point (of `names`,
        globs, in forward order) whose tensor holds a NaN or Inf, naming the hook, its layer and the token.

        Opt-in, so a plain forward pays nothing; checking every point also materialises the per-expert
        tensors (pass e.g. names=["layers.*.resid_*", "logits"] for a cheaper, coarser check). Hooks
        registered before the block run first, so their replacements are checked too.
        """
        patterns = [names] if isinstance(names, str) else list(names)
        return self.hooks([(p, _finite) for p in patterns])

    def run_with_cache(
        self, input_ids: torch.Tensor, names: Iterable[str] | None = None, *, grad: bool = False,
        metric: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, Cache] | tuple[torch.Tensor, Cache, Cache]:
        """Forward once and return (logits, {hook name: tensor}) for the hook names/globs asked (all if None).

        With `grad=True` and `metric` (logits -> a scalar tensor) autograd records the forward and the return is
        (logits, cache, grads): grads[name] is d metric / d tensor at each cached floating point, the tensor as
        the rest of the forward reads it (zeros where the metric does not depend on it). Routing: gradients flow
        through the top-k weights and the expert outputs; the discrete selection has none, so the integer points
        (`router.topk_ids`, indexer picks) are left out of grads. The Triton kernels have no backward: under
        autograd the `triton` backend runs the `grouped` backend's torch ops (the same sums; README,
        "Gradients and attribution").
        """
        if grad != (metric is not None):
            raise ValueError("run_with_cache: pass grad=True together with metric (a callable logits -> scalar)")
        if grad and self.parallel is not None:
            raise ValueError("run_with_cache(grad=True) does not run expert-parallel: the collectives have no "
                             "backward; load the model on one process")
        patterns = ["*"] if names is None else list(names)
        cache: dict[str, torch.Tensor] = {}

        def keep(x: torch.Tensor, ctx) -> torch.Tensor | None:
            if not grad or not x.is_floating_point():
                cache[ctx.name] = x.detach().clone()
                return None
            cache[ctx.name] = x = _recorded(x).view_as(x)  # its own node: the gradient of this point alone
            return x

        first = [(self.hook_names[0], lambda x, ctx: _recorded(x))] if grad else []  # every activation records
        with torch.set_grad_enabled(grad), self.hooks(first + [(p, keep) for p in patterns]):
            logits = self(input_ids, **kwargs)
            value = metric(logits) if grad else None
        if not grad:
            return logits, {n: cache[n] for n in self.hook_names if n in cache}
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"run_with_cache: metric must return a floating scalar tensor, got {value!r:.80}")
        kept = [n for n in self.hook_names if n in cache]
        wrt = [n for n in kept if cache[n].requires_grad]
        found = torch.autograd.grad(value.reshape(()), [cache[n] for n in wrt], allow_unused=True)
        grads = {n: torch.zeros_like(cache[n]) if g is None else g for n, g in zip(wrt, found)}
        return logits.detach(), {n: cache[n].detach() for n in kept}, grads

    @torch.no_grad()
    def generate(self, ids: Any, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop: int | Iterable[int] | None = None,
                 cache: State | None = None, chunk_tokens: int = 8192, progress: bool = True) -> torch.Tensor:
        """Ids [B, T + new] (LongTensor): `ids` [B, T] (or [T]) followed by up to `max_new_tokens` tokens, greedy
        (argmax, the lowest id on ties) or sampled (`do_sample`: logits / `temperature`, then the nucleus of
        probability mass `top_p`; `seed` makes the draws reproducible).

        The prompt is prefilled `chunk_tokens` at a time, then each new token is one forward step of the
        incremental state, so registered hooks and interventions fire at every step with absolute positions.
        A row that emits a `stop` id has finished: its later tokens repeat that id, and generation ends early
        once every row has. `cache`: a State to continue (`ids` start at its offset) and to keep; afterwards it
        holds every returned id but the last, so `generate(out[:, -1:], n, cache=cache)` goes on from there.
        """
        max_new_tokens = _count(max_new_tokens, "max_new_tokens", 0)
        chunk_tokens = _count(chunk_tokens, "chunk_tokens", 1)
        ids, stop_ids, generator = self.generation_args(ids, do_sample, temperature, top_p, seed, stop)
        if max_new_tokens == 0:
            return ids
        cache = State() if cache is None else cache
        # the output head runs on every prompt chunk only where a final.* / logits hook would see it
        head_hooked = any(hp.active for hp in self._hooks.points.values() if hp.layer is None)
        chunks = ids.split(chunk_tokens, dim=1)
        for i, chunk in enumerate(chunks):
            logits = self(chunk, cache=cache, head=head_hooked or i == len(chunks) - 1)
        out, done = [ids], torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        quiet = not progress or max_new_tokens <= 64
        with tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=quiet) as bar:
            for step in range(max_new_tokens):
                if step:
                    logits = self(out[-1], cache=cache)
                token = next_token(logits[:, -1], do_sample, temperature, top_p, generator)
                token = torch.where(done, out[-1][:, -1], token)  # a finished row repeats its stop id
                out.append(token[:, None])
                bar.update()
                done |= torch.isin(token, stop_ids)
                if done.all():
                    break
        return torch.cat(out, dim=1)

    def generation_args(self, ids: Any, do_sample: bool, temperature: Any, top_p: Any, seed: Any,
                        stop: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Generator | None]:
        """`generate`'s other arguments checked (InputError saying why): the ids, the stop ids [S], and the seeded
        generator (None: torch's global one). `workbench.trace(..., generate=N)` decodes with these too."""
        ids = self._check_ids(ids)
        if do_sample and not (isinstance(temperature, numbers.Real) and 0 < temperature < math.inf):
            raise InputError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
        if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
            raise InputError(f"top_p must lie in (0, 1], got {top_p!r}")
        try:
            stop_ids = torch.as_tensor([] if stop is None else stop, device=ids.device).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            stop_ids = None
        if stop_ids is None or stop_ids.numel() and (stop_ids.dtype.is_floating_point or stop_ids.is_complex()
                                                     or stop_ids.dtype == torch.bool):
            raise InputError(f"stop must be a token id or a sequence of token ids, got {stop!r}")
        stop_ids = stop_ids.long()
        if stop_ids.numel() and not (0 <= int(stop_ids.min()) and int(stop_ids.max()) < self.vocab_size):
            raise InputError(f"stop ids {stop_ids.tolist()} must lie in the vocabulary [0, {self.vocab_size})")
        if seed is None:
            if do_sample and self.parallel is not None:
                raise InputError("sampling under expert parallelism needs a seed, so that every rank draws the "
                                 "same tokens")
            return ids, stop_ids, None
        return ids, stop_ids, torch.Generator(device=ids.device).manual_seed(_count(seed, "seed", 0))


def _recorded(x: torch.Tensor) -> torch.Tensor:
    """x as autograd records it: itself where it already does, else a new leaf (a floating point reached by no
    recorded op, e.g. under a model whose parameters do not require grad)."""
    return x if x.requires_grad or not x.is_floating_point() else x.detach().requires_grad_()


def _count(value: Any, what: str, least: int) -> int:
    """An integer argument >= `least` (not a bool), else InputError."""
    try:
        n = operator.index(value)
    except TypeError:
        n = None
    if n is None or isinstance(value, bool) or n < least:
        raise InputError(f"{what} must be an integer >= {least}, got {value!r}")
    return n


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next id per row [B] from the last position's logits [B, vocab]: argmax, or a draw from the nucleus
    (the most probable tokens whose mass first reaches `top_p`) of softmax(logits / temperature)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1:
        ranked, order = probs.sort(-1, descending=True)
        outside = ranked.cumsum(-1) - ranked >= top_p  # the mass of the likelier tokens already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, ranked.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _finite(x: torch.Tensor, ctx: HookContext) -> None:
    """Raise NonFiniteError where a floating hook tensor [B, T, ...] holds a NaN or Inf."""
    if not x.is_floating_point():
        return
    bad = ~torch.isfinite(x)
    if not bad.any():
        return
    batch, t = bad.nonzero()[0, :2].tolist()
    position = int(ctx.positions[t])
    nan, inf = int(x.isnan().sum()), int(x.isinf().sum())
    layer = f" (layer {ctx.layer})" if ctx.layer is not None else ""
    raise NonFiniteError(f"non-finite values first appear at hook {ctx.name}{layer}: {nan} NaN and {inf} Inf, the "
                         f"first at batch {batch}, token position {position}", hook=ctx.name, layer=ctx.layer,
                         position=position)


# ---------------------------------------------------------------- checkpoint names


@dataclass(frozen=True)
class Rule:
    """Maps checkpoint tensors whose name fully matches `pattern` onto our parameters.

    `targets` are re.sub templates; a trailing `[\\N]` stores the tensor into slot N of a stacked
    parameter (routed experts). `split` turns one tensor into one tensor per target. No targets:
    a tensor we deliberately skip (e.g. DeepSeek's multi-token-prediction layer).
    """

    pattern: str
    targets: tuple[str, ...]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None  # one tensor -> one per target
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))


_SLOT = re.compile(r"^(.*)\[(\d+)\]$")


Targets = list[tuple[str, int | None]]
Split = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def map_tensor(rules: Iterable[Rule], name: str) -> tuple[Targets, Split | None] | None:
    """Our (parameter, slot) targets for checkpoint tensor `name` and the rule's split ([] targets: skip it);
    None if no rule matches."""
    for rule in rules:
        m = rule.regex.fullmatch(name)
        if m:
            out = []
            for target in rule.targets:
                t = m.expand(target)
                slot = _SLOT.match(t)
                out.append((slot[1], int(slot[2])) if slot else (t, None))
            return out, rule.split
    return None


def split_gate_up(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused [E, 2I, H] gate_up tensor (gate rows first) into gate and up."""
    return tuple(t.chunk(2, dim=-2))


def hf_rules(moe: str = "mlp", experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """Tensor names of HF-style decoders (Llama, Qwen, OLMoE, DeepSeek-V2/V3, Mixtral via arguments).

    `moe` is the MoE submodule name, `experts` the per-expert (gate, up, down) names. Routed experts
    are accepted one tensor per expert or already fused ([E, 2I, H] gate_up and [E, H, I] down).
    """
    L = r"model\.layers\.(\d+)\."
    g, u, d = experts
    return [
        Rule(r"model\.embed_tokens\.weight", ("embed.weight",)),
        Rule(r"model\.norm\.weight", ("norm.weight",)),
        Rule(r"lm_head\.weight", ("lm_head.weight",)),
        Rule(L + r"input_layernorm\.weight", (r"layers.\1.attn_norm.weight",)),
        Rule(L + r"post_attention_layernorm\.weight", (r"layers.\1.ffn_norm.weight",)),
        Rule(L + r"self_attn\.rotary_emb\.inv_freq", ()),
        Rule(L + r"self_attn\.(.+)", (r"layers.\1.attn.\2",)),
        Rule(L + rf"{moe}\.gate\.weight", (r"layers.\1.ffn.router.weight",)),
        Rule(L + rf"{moe}\.gate\.e_score_correction_bias", (r"layers.\1.ffn.router.correction_bias",)),
        Rule(L + rf"{moe}\.experts\.(\d+)\.{g}\.weight", (r"layers.\1.ffn.experts.gate_proj[\2]",)),
        Rule(L + rf"{moe}\.experts\.(\d+)\.{u}\.weight", (r"layers.\1.ffn.experts.up_proj[\2]",)),
        Rule(L + rf"{moe}\.experts\.(\d+)\.{d}\.weight", (r"layers.\1.ffn.experts.down_proj[\2]",)),
        Rule(L + rf"{moe}\.experts\.gate_up_proj",
             (r"layers.\1.ffn.experts.gate_proj", r"layers.\1.ffn.experts.up_proj"), split_gate_up),
        Rule(L + rf"{moe}\.experts\.down_proj", (r"layers.\1.ffn.experts.down_proj",)),
        Rule(L + rf"{moe}\.shared_experts?\.(\w+)\.weight", (r"layers.\1.ffn.shared.\2.weight",)),
        Rule(L + rf"{moe}\.shared_expert_gate\.weight", (r"layers.\1.ffn.shared_gate.weight",)),
        Rule(L + r"mlp\.(gate_proj|up_proj|down_proj)\.weight", (r"layers.\1.ffn.\2.weight",)),
    ]
