"""Memory per rank under expert (and tensor) parallelism, from a config alone: `workbench plan`.

The model is built on the `meta` device by its family's `build`, so every count is our runtime's own. Rank r
of N holds routed experts [r * E // N, (r + 1) * E // N) of every MoE layer; every other parameter is
replicated, except under tensor parallelism over groups of T consecutive ranks (T dividing N): there each
attention module's own `split_heads(0, T)` (DeepSeek-V4) is called on copies of the meta modules, as the
loader calls it, and each rank holds what it keeps. Two byte counts per rank:

- in memory, as loaded: quantised weights kept as stored (`workbench.load`'s default: FP8 codes with an fp32
  scale per block, FP4 codes two per byte with a one-byte exponent per 32 inputs; a tensor-parallel cut that
  splits a block holds its part's scales on a finer grid, `quant.cut_block`), other floating parameters in the
  runtime dtype, those matching `loading.KEEP_FP32` in fp32, integer tables in their integer dtype; with
  `dequantize=True`, as `load(dequantize=True)` holds them: every floating weight in the runtime dtype;
- read from disk, as the config's `quantization_config` declares the checkpoint: FP8 e4m3 with one scale
  per block for the linear layers DeepSeek quantises, FP4 e2m1 (two per byte) with one ue8m0 scale per 32
  inputs for routed experts under `expert_dtype: fp4` or MXFP4 (GPT-OSS), every other tensor in the checkpoint
  dtype (fp32 where the runtime keeps fp32). A tensor cut by heads is read in part, unless it is block-scaled
  FP8: the loader reads that whole with its scales, then cuts it.

With a context of C tokens, each rank also holds one sequence's attention state (attention is replicated),
computed from the architecture exactly as `State.nbytes` counts it; tensor parallelism leaves it whole
(V4's keys are shared by all heads, and the compressors and indexers are not split).
"""

from __future__ import annotations

import copy
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, quant
from .config import Config
from .errors import CheckpointError
from .loading import KEEP_FP32, _build
from .models import deepseek_v4, family
from .models.deepseek_v32 import SparseMLA
from .models.layers import GroupedQueryAttention
from .models.mla import MLA

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.\w+")  # routed experts, stacked [E, ...]
# linear weights the published FP8 checkpoints keep unquantised: the output head, V4's compressor projections
# and the indexers' head weights (the embedding, norms and routers are not nn.Linear)
UNQUANTISED = re.compile(r"lm_head\.weight|.*\.(compressor\.wkv|compressor\.wgate|weights_proj)\.weight")
POSITION_BYTES = 8  # each cached key's int64 position
GiB = 2**30


@dataclass(frozen=True)
class Bytes:
    """One rank's bytes: the replicated parameters, the routed experts of the fullest rank and, under tensor
    parallelism, the rank's share of the parameters split by heads (the same on every rank)."""

    replicated: int
    experts: int
    heads: int = 0

    @property
    def total(self) -> int:
        return self.replicated + self.experts + self.heads


@dataclass(frozen=True)
class Share:
    """One rank's part of the parameters split by heads: how many, bytes in memory, bytes read from disk."""

    params: int
    memory: int
    disk: int


@dataclass(frozen=True)
class Plan:
    """Parameters and bytes per rank of one model at one world size (and optionally one context length)."""

    source: str
    model_type: str
    world_size: int
    tensor_parallel: int  # ranks per group that split the heads (1: none)
    dtype: torch.dtype  # floating parameters in memory (fp32-kept ones aside)
    quantization: str  # how the checkpoint stores them on disk
    dequantized: bool  # memory counts quantised weights dequantised to `dtype` (else kept as stored)
    params: int  # every parameter, all ranks together
    active: int  # per token: replicated + top-k experts of every MoE layer
    replicated_params: int
    head_params: tuple[str, ...]  # parameters split by heads, named within their attention module (empty: none)
    split_params: int  # those parameters, all ranks together
    split_params_per_rank: int
    experts: int  # routed experts per MoE layer (the fewest, if layers differ)
    moe_layers: int
    experts_per_rank: int  # experts per MoE layer on the fullest rank
    memory: Bytes  # held in memory per rank, as loaded
    disk: Bytes  # read from disk per rank, as stored
    context: int | None
    state: int  # one sequence's attention state for `context` tokens (every rank holds it)

    @property
    def per_rank(self) -> int:
        """Bytes in memory per rank: parameters plus the attention state."""
        return self.memory.total + self.state


@dataclass(frozen=True)
class Keys:
    """Cached keys (and values) of one attention layer: `per_token` bytes per kept token, the last
    `window - 1` tokens for a sliding layer, every token otherwise."""

    window: int | None
    per_token: int

    def bytes(self, tokens: int) -> int:
        kept = tokens if self.window is None else min(tokens, self.window - 1)
        return kept * self.per_token


@dataclass(frozen=True)
class Pooled:
    """A V4 compressor's state: T // rate pooled entries, the projections (kv and gate, `width` wide) of the
    T % rate tokens of the unfinished window and, overlapping (CSA), the last window's first series."""

    rate: int
    dim: int
    width: int
    overlap: bool
    size: int  # bytes per value in the model dtype
    gate_size: int  # bytes per kept gate value (gate + ape, promoted to the ape's fp32)

    def bytes(self, tokens: int) -> int:
        done, pending = divmod(tokens, self.rate)
        out = done * self.dim * self.size + 2 * pending * self.width * self.size
        if self.overlap and done:
            out += self.rate * self.dim * (self.size + self.gate_size)
        return out


@dataclass(frozen=True)
class ExpertGroup:
    """MoE layers with the same expert count: what one expert slot costs summed over those layers."""

    experts: int
    layers: int
    top_k: int
    params: int  # parameters of one expert slot, summed over the layers
    memory: int
    disk: int


@dataclass(frozen=True)
class Census:
    """A model's parameters split into replicated ones, ones split by heads over groups of `tensor_parallel`
    ranks and routed experts, in memory and on disk, and the terms of its per-sequence attention state:
    everything a plan needs, for any world size that is a multiple of `tensor_parallel`."""

    source: str
    model_type: str
    dtype: torch.dtype
    quantization: str
    dequantized: bool
    replicated_params: int
    replicated_memory: int
    replicated_disk: int
    groups: tuple[ExpertGroup, ...]
    state_terms: tuple[Keys | Pooled, ...]
    tensor_parallel: int  # ranks per group that split the heads (1: none)
    split: Share  # the parameters split by heads, all ranks together (counted in replicated_* too)
    share: Share  # one rank's part of them
    head_params: tuple[str, ...]  # what `split_heads` cuts, named within its module

    @property
    def experts(self) -> int:
        """Routed experts per MoE layer (the fewest, if layers differ); 0 for a dense model."""
        return min((g.experts for g in self.groups), default=0)

    @property
    def world_sizes(self) -> list[int]:
        """The world sizes a plan may have: multiples of the tensor-parallel group size, up to one expert per
        rank."""
        return list(range(self.tensor_parallel, max(self.experts, 1) + 1, self.tensor_parallel))

    def state(self, tokens: int) -> int:
        """Bytes of one sequence's attention state after `tokens` tokens."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"context must be a positive number of tokens, got {tokens!r}")
        return sum(term.bytes(tokens) for term in self.state_terms)

    def at(self, world_size: int, context: int | None = None) -> Plan:
        """The plan at `world_size` ranks (refused where some rank would hold no expert of a layer, or where
        the tensor-parallel group size does not divide it)."""
        self._check(world_size)
        held = [[_held(r, world_size, g.experts) for g in self.groups] for r in range(world_size)]
        fullest = max(held, key=lambda counts: sum(n * g.memory for n, g in zip(counts, self.groups)))
        memory = sum(n * g.memory for n, g in zip(fullest, self.groups))
        disk = sum(n * g.disk for n, g in zip(fullest, self.groups))
        expert_params = sum(g.experts * g.params for g in self.groups)
        return Plan(
            source=self.source, model_type=self.model_type, world_size=world_size,
            tensor_parallel=self.tensor_parallel, dtype=self.dtype, quantization=self.quantization,
            dequantized=self.dequantized, params=self.replicated_params + expert_params,
            active=self.replicated_params + sum(g.top_k * g.params for g in self.groups),
            replicated_params=self.replicated_params - self.split.params, head_params=self.head_params,
            split_params=self.split.params, split_params_per_rank=self.share.params, experts=self.experts,
            moe_layers=sum(g.layers for g in self.groups),
            experts_per_rank=max((_held(r, world_size, self.experts) for r in range(world_size))),
            memory=Bytes(self.replicated_memory - self.split.memory, memory, self.share.memory),
            disk=Bytes(self.replicated_disk - self.split.disk, disk, self.share.disk),
            context=context, state=0 if context is None else self.state(context),
        )

    def smallest_world_size(self, budget: int, context: int | None = None) -> int | None:
        """The fewest ranks whose per-rank memory (parameters and state) fits in `budget` bytes; None if it does not
        fit at the largest world size."""
        return next((n for n in self.world_sizes if self.at(n, context).per_rank <= budget), None)

    def _check(self, world_size: int) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be a positive integer, got {world_size!r}")
        if not self.groups and world_size > 1:
            raise ValueError(f"{self.source}: the model has no routed experts, so expert parallelism has nothing "
                             f"to split; every rank would hold the whole model (use world size 1)")
        if world_size > max(self.experts, 1):
            raise ValueError(f"world size {world_size} exceeds the {self.experts} routed experts per layer: rank r "
                             f"holds experts [r*E//N, (r+1)*E//N), so some ranks would hold none; use at most "
                             f"{self.experts} ranks")
        if world_size % self.tensor_parallel:
            raise ValueError(f"tensor parallelism over groups of {self.tensor_parallel} ranks needs a world size "
                             f"divisible by {self.tensor_parallel}, got {world_size}")


def _held(rank: int, world_size: int, experts: int) -> int:
    """Experts of one layer held by `rank`: [rank * E // N, (rank + 1) * E // N)."""
    return (rank + 1) * experts // world_size - rank * experts // world_size


def plan(source: str | Path, world_size: int, *, dtype: torch.dtype | str | None = None,
         context: int | None = None, revision: str | None = None, tensor_parallel: int = 1,
         dequantize: bool = False) -> Plan:
    """Parameters and bytes per rank of `source` (checkpoint folder, config.json path or hub repo id) at
    `world_size` ranks, with attention heads split over groups of `tensor_parallel` ranks, and with one
    sequence's attention state for `context` tokens if given; memory as `load(dequantize=...)` holds it."""
    return census(source, dtype=dtype, revision=revision, tensor_parallel=tensor_parallel,
                  dequantize=dequantize).at(world_size, context)


def census(source: str | Path, *, dtype: torch.dtype | str | None = None, revision: str | None = None,
           tensor_parallel: int = 1, dequantize: bool = False) -> Census:
    """Build the model on the meta device from its config alone and count what each parameter costs, with
    attention heads split over groups of `tensor_parallel` ranks, quantised weights kept as stored (or, with
    `dequantize`, dequantised to `dtype`)."""
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor parallel size must be a positive integer, got {tensor_parallel!r}")
    cfg = read_config(source, revision)
    fam = family(cfg)
    with torch.device("meta"):
        model = _build(fam, cfg)
    model.tie_weights()
    dtype = runtime_dtype(dtype) or cfg.dtype
    scheme = quant.scheme(cfg)
    scale_bytes = 1 if cfg.get("model_type") == "deepseek_v4" else 4  # V4's `.scale` is ue8m0, HF's fp32
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kept: dict[str, torch.dtype] = {}  # parameter -> its dtype in memory (dequantised)
    formats: dict[str, str] = {}  # parameter -> how the checkpoint stores it quantised: "fp8" or "fp4"

    def held(name: str, shape: tuple[int, ...], cut: int | None = None) -> int:
        """Bytes in memory of `name` (shape: one expert's, or a rank's part cut along dim `cut`)."""
        fmt = None if dequantize else formats.get(name)
        if fmt is None:
            return math.prod(shape) * kept[name].itemsize
        if fmt == "fp4":
            return _fp4_bytes(shape)
        block = scheme.block if cut is None else quant.cut_block(scheme.block, cut, shape[cut])
        return _fp8_bytes(shape, block, 4)  # scales held in fp32

    # replicated parameter -> bytes per value read from disk (None where the loader reads it whole: block-scaled
    # FP8), bytes read whole
    cost: dict[str, tuple[int | None, int]] = {}
    params = memory = disk = 0  # replicated
    slots: dict[int, dict[str, int]] = defaultdict(lambda: dict(params=0, memory=0, disk=0))  # one expert, per layer
    for name, p in model.named_parameters():
        expert = EXPERT.fullmatch(name)
        shape = tuple(p.shape[1:]) if expert else tuple(p.shape)
        if not p.dtype.is_floating_point:
            kept[name] = stored = p.dtype
        elif KEEP_FP32.fullmatch(name):
            kept[name] = stored = torch.float32
        else:
            kept[name], stored = dtype, cfg.dtype
        if scheme is not None and expert and len(shape) == 2:
            formats[name] = "fp4" if scheme.fp4_experts else "fp8"
        elif scheme is not None and not scheme.mxfp4 and name in linears and not UNQUANTISED.fullmatch(name):
            formats[name] = "fp8"
        fmt = formats.get(name)
        if fmt is None:
            on_disk = math.prod(shape) * stored.itemsize
        else:
            on_disk = _fp4_bytes(shape) if fmt == "fp4" else _fp8_bytes(shape, scheme.block, scale_bytes)
        if expert:
            slot = slots[int(expert[1])]
            slot["experts"] = p.shape[0]
            slot["params"] += math.prod(shape)
            slot["memory"] += held(name, shape)
            slot["disk"] += on_disk
        else:
            params, memory, disk = params + p.numel(), memory + held(name, shape), disk + on_disk
            cost[name] = None if fmt == "fp8" else stored.itemsize, on_disk
    groups: dict[tuple[int, int], list[dict[str, int]]] = defaultdict(list)
    for layer, slot in slots.items():
        groups[slot["experts"], model.get_submodule(f"layers.{layer}.ffn").router.spec.top_k].append(slot)
    terms = [t for i, layer in model.layers.items() for t in _state_terms(layer.attn, f"layers.{i}.attn", kept, dtype)]
    fewest = min((s["experts"] for s in slots.values()), default=1)
    parts, head_params = _head_split(model, cfg, tensor_parallel, fewest)
    whole = {p: (tuple(model.get_parameter(p).shape), None) for p in parts}
    split, share = (Share(sum(math.prod(shape) for shape, _ in values.values()),
                          sum(held(p, shape, dim) for p, (shape, dim) in values.items()),
                          sum(cost[p][1] if cost[p][0] is None else math.prod(shape) * cost[p][0]
                              for p, (shape, _) in values.items()))
                    for values in (whole, parts))
    return Census(
        source=str(source), model_type=str(cfg.get("model_type")), dtype=dtype, quantization=describe(cfg),
        dequantized=dequantize or scheme is None,
        replicated_params=params, replicated_memory=memory, replicated_disk=disk,
        groups=tuple(ExpertGroup(experts=e, layers=len(g), top_k=k, params=sum(s["params"] for s in g),
                                 memory=sum(s["memory"] for s in g), disk=sum(s["disk"] for s in g))
                     for (e, k), g in sorted(groups.items())),
        state_terms=tuple(terms), tensor_parallel=tensor_parallel, split=split, share=share,
        head_params=head_params,
    )


def _head_split(model: nn.Module, cfg: Config, size: int,
                most: int) -> tuple[dict[str, tuple[tuple[int, ...], int]], tuple[str, ...]]:
    """Every attention module's `split_heads(0, size)` on copies of the meta modules, as the loader calls it for
    groups of `size` ranks: {parameter: (shape of the part rank 0 keeps, the dim cut)} (every rank keeps as much)
    and the parameters cut, named within their module; nothing for `size` 1. A refused size names those accepted
    up to `most`."""
    if size == 1:
        return {}, ()
    attention = [(name, m) for name, m in model.named_modules() if hasattr(m, "split_heads")]
    if not attention:
        raise CheckpointError(f"tensor parallelism is not available for {cfg.get('model_type')!r} (DeepSeek-V4 "
                              "attention only); plan expert parallelism alone", file=cfg.file)
    try:
        cut = {f"{prefix}.{p}": (m, p, c[0]) for prefix, m in copy.deepcopy(attention)
               for p, c in m.split_heads(0, size).items()}
    except CheckpointError as e:
        sizes = ", ".join(map(str, _group_sizes(attention, most)))
        raise ValueError(f"{e}; this model's heads split over groups of {sizes} ranks") from None
    if size > most:
        raise ValueError(f"tensor parallel size {size} exceeds the {most} routed experts per layer: every world "
                         f"size divisible by {size} would leave some ranks without experts")
    return ({n: (tuple(m.get_parameter(p).shape), dim) for n, (m, p, dim) in cut.items()},
            tuple(sorted({p for _, p, _ in cut.values()})))


def _group_sizes(attention: list[tuple[str, nn.Module]], most: int) -> list[int]:
    """The group sizes up to `most` whose `split_heads` every attention module accepts, tried on copies."""
    sizes, probe = [], copy.deepcopy(attention)
    for size in range(1, most + 1):
        for i, (_, m) in enumerate(probe):
            try:
                m.split_heads(0, size)
            except CheckpointError:
                probe = copy.deepcopy(attention) if i else probe  # reused where split_heads refused before any cut
                break
        else:
            sizes.append(size)
            probe = copy.deepcopy(attention)
    return sizes


def read_config(source: str | Path, revision: str | None = None) -> Config:
    """The config of a checkpoint folder, a config.json file, or a hub repo id (only its config.json is fetched)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return Config.read(path / "config.json")
    if path.is_file():
        return Config.read(path)
    text = str(source)
    if path.exists() or text.startswith(("/", ".", "~")) or not checkpoint._REPO_ID.match(text):
        raise CheckpointError("no such checkpoint folder or config file (and not a hub repo id)", file=text)
    checkpoint.check_trusted(text, None)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Config.read(Path(hf_hub_download(repo_id=text, filename="config.json", revision=revision)))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        where = f"{text}@{revision}" if revision else text
        raise CheckpointError(f"could not fetch config.json from the hub (offline, or no such repo or file): {e}",
                              file=where) from None


def runtime_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype given as torch.dtype or by name (bf16, bfloat16, fp16, float16, fp32, float32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def describe(cfg: Config) -> str:
    """How the checkpoint stores its weights, per the config's quantization_config."""
    scheme, dtype = quant.scheme(cfg), str(cfg.dtype).removeprefix("torch.")
    if scheme is None:
        return f"unquantised {dtype} (fp32 where the runtime keeps fp32)"
    if scheme.mxfp4:
        return f"MXFP4 routed experts (e2m1 two per byte, an e8m0 scale per 32 inputs), the rest {dtype}"
    scale = "ue8m0" if cfg.get("model_type") == "deepseek_v4" else "fp32"
    experts = "FP4 e2m1 with a ue8m0 scale per 32 inputs" if scheme.fp4_experts else "FP8 like the linears"
    return (f"FP8 e4m3 linears with {scale} scales per {scheme.block[0]}x{scheme.block[1]} block, routed experts "
            f"{experts}, the rest {dtype}")


def _fp8_bytes(shape: tuple[int, ...], block: tuple[int, int], scale_bytes: int) -> int:
    """One byte per value and one scale per block."""
    return math.prod(shape) + math.prod(quant.fp8_scale_shape(shape, block)) * scale_bytes


def _fp4_bytes(shape: tuple[int, ...]) -> int:
    """Two values per byte and a one-byte scale per 32 inputs of a row."""
    return shape[0] * math.ceil(shape[1] / 2) + math.prod(quant.fp4_scale_shape(shape))


def _state_terms(attn: nn.Module, prefix: str, kept: dict[str, torch.dtype], dtype: torch.dtype) -> list[Keys | Pooled]:
    """What one layer's attention keeps per sequence, as the runtime's `State` holds it."""
    size = dtype.itemsize
    if isinstance(attn, deepseek_v4.V4Attention):
        terms: list[Keys | Pooled] = [Keys(attn.window, POSITION_BYTES + attn.head_dim * size)]
        pooled = {"compressor": attn.compressor,
                  "indexer.compressor": None if attn.indexer is None else attn.indexer.compressor}
        for path, c in pooled.items():
            if c is not None:
                gate = torch.promote_types(dtype, kept[f"{prefix}.{path}.ape"])  # gate + ape
                terms.append(Pooled(c.rate, c.dim, c.ape.shape[1], c.overlap, size, gate.itemsize))
        return terms
    if isinstance(attn, MLA):
        index = attn.indexer.dim if isinstance(attn, SparseMLA) else 0
        return [Keys(None, POSITION_BYTES + (attn.kv_rank + attn.rope + index) * size)]
    if isinstance(attn, GroupedQueryAttention):
        return [Keys(attn.window, POSITION_BYTES + 2 * attn.kv_heads * attn.head_dim * size)]
    raise ValueError(f"the attention state of {type(attn).__name__} is not modelled by `workbench plan`")


def report(p: Plan) -> str:
    """A readable table of one plan: per rank, in memory and read from disk."""
    dtype = str(p.dtype).removeprefix("torch.")
    lines = [f"{p.source} ({p.model_type}): {p.params / 1e9:,.2f} B parameters, {p.active / 1e9:,.2f} B active "
             f"per token"]
    split = f"; split by heads: {p.split_params / 1e9:,.2f} B" if p.head_params else ""
    if p.moe_layers:
        lines += [f"  replicated on every rank: {p.replicated_params / 1e9:,.2f} B{split}; routed experts: "
                  f"{(p.params - p.replicated_params - p.split_params) / 1e9:,.2f} B in {p.moe_layers} MoE layers "
                  f"of {p.experts}",
                  f"world size {p.world_size}: rank r holds experts [r*{p.experts}//{p.world_size}, "
                  f"(r+1)*{p.experts}//{p.world_size}) of every MoE layer, at most {p.experts_per_rank}"]
    else:
        lines.append(f"world size {p.world_size}: no routed experts, every parameter replicated")
    if p.head_params:
        t = p.tensor_parallel
        lines.append(f"tensor parallel over groups of {t} consecutive ranks: rank r keeps heads [(r%{t})*H/{t}, "
                     f"(r%{t}+1)*H/{t}) and their output groups, its part of {', '.join(p.head_params)} in every "
                     f"attention layer: {p.split_params_per_rank / 1e9:,.2f} B parameters (block-scaled FP8 ones "
                     f"are read whole, then cut)")
    state = "-"
    if p.context is not None:
        lines.append(f"context {p.context:,} tokens: one sequence's attention state, held on every rank")
        state = _gib(p.state)
    columns = ["replicated", *(["heads"] if p.head_params else []), "experts", "state", "total"]
    held = f"{dtype}" if p.dequantized else f"{dtype}, quantised kept"
    lines += ["", _row("per rank, GiB", columns),
              _row(f"in memory, as loaded ({held})", _cells(p, p.memory, state, p.per_rank)),
              _row("read from disk, as stored", _cells(p, p.disk, "-", p.disk.total)),
              f"stored as: {p.quantization}"]
    if not p.dequantized:
        lines.append(f"quantised weights are held as stored (codes and scales); --dequantize counts them dequantised "
                     f"to {dtype}, as load(dequantize=True) holds them")
    return "\n".join(lines)


def fit_report(c: Census, budget: int, context: int | None = None) -> str:
    """The smallest world size whose per-rank memory fits `budget` bytes, or why none does."""
    head = f"{budget / GiB:,.2f} GiB per rank (parameters and attention state; activations and workspace excluded)"
    n = c.smallest_world_size(budget, context)
    if n is not None:
        return f"fits {head} from world size {n} ({_gib(c.at(n, context).per_rank)} GiB per rank)"
    most = c.at(c.world_sizes[-1], context)
    fixed = most.memory.replicated + most.memory.heads + most.state
    if fixed > budget:
        what = ["the replicated parameters"]
        what += [f"a rank's share of the heads (groups of {c.tensor_parallel})"] if c.head_params else []
        what += [] if context is None else ["the attention state"]
        splits = ("expert and tensor parallelism split only the routed experts and the attention heads"
                  if c.head_params else "expert parallelism splits only the routed experts")
        what_text = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
        return f"does not fit {head} at any world size: {what_text} alone take {_gib(fixed)} GiB, and {splits}"
    where = (f"one expert per MoE layer per rank (world size {most.world_size})" if most.experts_per_rank == 1 else
             f"the largest world size divisible by {c.tensor_parallel} ({most.world_size}, at most "
             f"{most.experts_per_rank} experts per MoE layer per rank)")
    return f"does not fit {head} at any world size: even {where} takes {_gib(most.per_rank)} GiB"


def _cells(p: Plan, b: Bytes, state: str, total: int) -> list[str]:
    """One row's GiB: replicated, heads (only under tensor parallelism), experts, state, total."""
    return [_gib(b.replicated), *([_gib(b.heads)] if p.head_params else []), _gib(b.experts), state, _gib(total)]


def _row(label: str, cells: list[str]) -> str:
    return f"{label:<50}" + "".join(f"{c:>12}" for c in cells)


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"
