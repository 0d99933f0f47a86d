"""`workbench.load`: checkpoint folder or hub repo -> a hookable model with its weights, checked first."""

from __future__ import annotations

import importlib.util
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, distributed, provenance, quant
from .config import Config
from .errors import CheckpointError
from .models import family
from .models.base import CausalLM, Split, Targets, map_tensor
from .models.layers import BlockFP8Linear
from .models.moe import Experts, MoE
from .tokenizer import load_tokenizer

BACKENDS = ("auto", "torch", "grouped", "triton")
FLOAT_DTYPES = {"F32", "F16", "BF16"}
QUANT_SUFFIXES = ("_blocks", "_scales", "weight_scale_inv", ".scale")
QUANT_MESSAGE = ("quantised weights of this kind are not supported yet (FP8 loads as e4m3 weights with block "
                 "scales `weight_scale_inv` or `scale` under quantization_config.quant_method 'fp8', FP4 experts "
                 "with expert_dtype 'fp4', MXFP4 experts as `_blocks` with their `_scales` under quant_method "
                 "'mxfp4')")
# kept fp32 whatever the model dtype: selection-only biases, and V4's sinks, pooling biases and stream mixings
KEEP_FP32 = re.compile(r".*(correction_bias|attn_sink|\.ape|hc_\w+\.(fn|base|scale))")
INT_DTYPES = {"I64", "I32", "I16", "I8", "U8"}
EXPERT_PARAM = re.compile(r".*\.experts\.(gate|up|down)_(proj|bias)")  # stacked routed-expert parameters


def load(
    source: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    backend: str = "auto",
    trusted_repos: Iterable[str] | None = None,
    verify_hashes: bool = True,
    expert_parallel: bool | None = None,
    tensor_parallel: int = 1,
    dequantize: bool = False,
) -> CausalLM:
    """Load a Hugging Face MoE (or dense) checkpoint from a local folder or a hub repo id.

    Every safetensors header and tensor shape is checked against the config before any weight is
    read; anything wrong raises `CheckpointError` naming the file and tensor. Pickle files are never
    opened and code shipped with a checkpoint is never run. A hub repo id must match a glob of
    `trusted_repos` (else of $WORKBENCH_TRUSTED_REPOS) where either is set. With `verify_hashes`, files
    with a recorded sha256 (the folder's SHA256SUMS, the hub cache's blob names) are hashed while loading
    and a mismatch is refused.

    `expert_parallel` (default: whenever torch.distributed is initialised with more than one rank, e.g. under
    torchrun after `workbench.distributed.init()`) makes this rank read and hold only its own range of every
    MoE layer's routed experts (see workbench.models.moe); files with recorded hashes are then hashed by one
    rank each, and a failure on any rank is raised on every rank. `tensor_parallel=T` also splits attention
    heads over groups of T consecutive ranks (T dividing the world size, e.g. the GPUs of one node) where the
    family supports it (DeepSeek-V4). `model.load_report` says what was read.

    Quantised weights stay as stored (docs/references.md, "Quantised formats"): FP8 linears become
    `BlockFP8Linear` modules and quantised routed experts hold codes and scales (`workbench.quant`'s layout),
    dequantised one expert at a time as they run, so memory is about what the checkpoint stores.
    `dequantize=True` dequantises every weight on load into `dtype` instead.
    """
    backend = _backend(backend, device)
    rank, world = distributed.rank_and_world()
    parallel = world > 1 if expert_parallel is None else expert_parallel
    if (parallel or tensor_parallel > 1) and world == 1:
        raise ValueError("expert_parallel / tensor_parallel need torch.distributed initialised with more than one "
                         "rank (launch with torchrun and call workbench.distributed.init())")
    if tensor_parallel > 1 and not parallel:
        raise ValueError("tensor_parallel comes with expert parallelism (expert_parallel=True)")
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int):
        raise TypeError(f"tensor_parallel is a number of ranks (1: heads not split), got {tensor_parallel!r}")
    if not 1 <= tensor_parallel <= world or world % tensor_parallel:
        raise ValueError(f"tensor_parallel={tensor_parallel} must divide the world size {world}")
    with distributed.agreed(parallel):
        folder, commit = checkpoint.resolve(source, revision, trusted_repos)
        cfg, fam = _config(folder)
        tensors = checkpoint.weight_files(folder)
        weights = sorted({info.file for info in tensors.values()})
        read = [folder / n for n in checkpoint.LOADER_FILES if (folder / n).is_file()]
        expected = checkpoint.recorded_sha256(folder, read + weights, weights) if verify_hashes else {}
        if parallel:  # each file hashed once, by one rank
            expected = {f: v for i, (f, v) in enumerate(sorted(expected.items())) if i % world == rank}
        with checkpoint.verified(expected):
            with torch.device("meta"):
                model = _build(fam, cfg)
            shards = _shard_experts(model, rank, world) if parallel else {}
            heads = _split_heads(model, tensor_parallel, cfg) if tensor_parallel > 1 else {}
            dtype = dtype or cfg.dtype
            for name, p in model.named_parameters():
                if p.dtype.is_floating_point:
                    p.data = p.data.to(torch.float32 if KEEP_FP32.fullmatch(name) else dtype)
            scheme = quant.scheme(cfg)
            plan, expert_bytes = _plan(model, tensors, fam.rules(cfg), scheme, shards, heads)
            if scheme is not None and not dequantize:
                _hold_quantised(model, tensors, plan, scheme, heads)
            tokenizer = load_tokenizer(folder, model.vocab_size)  # a bad tokenizer file raises CheckpointError
            model.to_empty(device=device or "cpu")
            model.tie_weights()
            model.load_report = _copy(model, tensors, plan, scheme, shards)
            model.load_report.update(rank=rank, world=world if parallel else 1,
                                     bytes_total=sum(_nbytes(i) for i in tensors.values()),
                                     expert_bytes_total=expert_bytes)
    model.eval().requires_grad_(False)
    for module in model.modules():
        if hasattr(module, "backend"):  # the model, its MoE blocks and their routers
            module.backend = backend
    model.source, model.revision, model.commit = str(source), revision, commit
    model.checkpoint_dir, model.tokenizer = folder, tokenizer
    provenance.record_model(model, weights)  # only under `workbench publish` / `verify`: hashes for the manifest
    return model


def _backend(backend: str, device: str | torch.device | None) -> str:
    """The routed-experts backend to use: `auto` is the Triton kernels on CUDA (when triton is installed), else
    the grouped CPU path; `triton` elsewhere only under TRITON_INTERPRET=1 (the kernels' CPU test mode)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available; choose from {', '.join(BACKENDS)}")
    cuda = torch.device(device or "cpu").type == "cuda"
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if cuda and has_triton else "grouped"
    if backend == "triton" and not has_triton:
        raise ValueError("backend 'triton' needs the triton package (pip install triton)")
    if backend == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' runs on CUDA devices (on a CPU only under TRITON_INTERPRET=1, for "
                         "testing); use 'grouped' here")
    return backend


def _config(folder: Path) -> tuple[Config, ModuleType]:
    """The checked config and its family module; a config that needs its own code (`auto_map`) to build an
    unsupported `model_type` is refused saying so, and its code is never run."""
    file = folder / "config.json"
    try:
        cfg = Config.read(file)
    except CheckpointError:
        raise
    except (ValueError, RecursionError, OSError) as e:  # nested too deeply, integers past the digit limit, unreadable
        raise CheckpointError(f"not a readable config ({type(e).__name__}: {e})", file=str(file)) from None
    checkpoint.warn_about_code(folder, cfg.data)
    model_type = cfg.data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"model_type must be a string, got {model_type!r}", file=str(file))
    try:
        return cfg, family(cfg)
    except CheckpointError as e:
        code = cfg.data.get("auto_map")
        if not code:
            raise
        raise CheckpointError(f"{e.reason}; its auto_map points at the checkpoint's own code ({code}), which "
                              "workbench never runs", file=e.file) from None


def _build(fam: ModuleType, cfg: Config) -> CausalLM:
    """The family's model for this config (on the current default device); any failure is the config's."""
    try:
        return fam.build(cfg)
    except CheckpointError:
        raise
    except Exception as e:  # building reads only the config: a field of the wrong kind or size broke it
        raise CheckpointError(f"the config does not describe a buildable model ({type(e).__name__}: {e})",
                              file=cfg.file) from None


# checkpoint tensor -> our (parameter, slot)s, its split, its scale tensor if quantised, and the part this rank
# holds, (dim, start, stop), under expert or tensor parallelism (None: all of it)
Cut = tuple[int, int, int]
LoadPlan = dict[str, tuple[Targets, Split | None, str | None, Cut | None]]


def _shard_experts(model: CausalLM, rank: int, world: int) -> dict[str, distributed.ExpertParallel]:
    """Give every MoE block this rank's range of its routed experts (still on meta: nothing allocated yet);
    returns {stacked expert parameter: its block's ExpertParallel}."""
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("expert parallelism needs a model with routed experts; this one has none")
    shards = {}
    for name, moe in moes:
        ep = distributed.ExpertParallel(rank, world, moe.experts.gate_proj.shape[0])
        moe.parallel = model.parallel = ep
        for pname, p in moe.experts.named_parameters():
            p.data = torch.empty(len(ep.owned), *p.shape[1:], dtype=p.dtype, device="meta")
            shards[f"{name}.experts.{pname}"] = ep
    return shards


def _split_heads(model: CausalLM, size: int, cfg: Config) -> dict[str, tuple[int, int, int, int]]:
    """Tensor parallelism over groups of `size` ranks: every attention module that can (`split_heads`) keeps
    this rank's share of the heads; returns {parameter: (dim, start, stop, full size)} of the tensors to cut."""
    index, group = distributed.head_group(size)
    cuts = {}
    for name, module in model.named_modules():
        if hasattr(module, "split_heads"):
            cuts.update({f"{name}.{p}": cut for p, cut in module.split_heads(index, size, group).items()})
    if not cuts:
        raise CheckpointError(f"tensor parallelism is not available for {cfg.get('model_type')!r} (DeepSeek-V4 "
                              "attention only); use expert parallelism alone", file=cfg.file)
    return cuts


def _plan(model: CausalLM, tensors: dict[str, checkpoint.TensorInfo], rules, scheme: quant.Scheme | None,
          shards: dict[str, distributed.ExpertParallel],
          heads: dict[str, tuple[int, int, int, int]]) -> tuple[LoadPlan, int]:
    """Map every checkpoint tensor onto our parameters and check shapes and coverage, reading no data;
    under expert parallelism (`shards`) other ranks' experts are checked but left out of the plan, under
    tensor parallelism (`heads`) this rank's part of a split tensor is planned. Also returns the bytes the
    checkpoint stores for routed experts (weights, biases and scales), all ranks together."""
    params = dict(model.named_parameters())
    if model.tied:
        params.pop("lm_head.weight", None)
    filled: dict[str, set] = defaultdict(set)
    plan: LoadPlan = {}
    expert_bytes = 0
    paired = {quant.scale_of(n, tensors) for n, i in tensors.items() if _quant_kind(n, i.dtype, scheme)} - {None}
    for name, info in tensors.items():
        where = dict(file=str(info.file), tensor=name)
        mapped = map_tensor(rules, name)
        targets, split = mapped or (None, None)
        if targets == [] or (model.tied and targets == [("lm_head.weight", None)]):
            continue  # deliberately skipped (e.g. MTP layers), or a tied head saved beside the embedding
        if name in paired:
            continue  # read with its weight
        kind = _quant_kind(name, info.dtype, scheme)
        scale = quant.scale_of(name, tensors) if kind else None
        shape = list(info.shape)
        stored = f"shape {shape}"
        if scale:
            shape = list(quant.weight_shape(shape, kind))
            stored = f"{kind.upper()} {stored} (of {shape})" if shape != list(info.shape) else stored
            s = tensors[scale]
            grid = scheme.block if kind == "fp8" else quant.FP4_BLOCK
            dtypes = {"U8"} if kind == "mxfp4" else quant.SCALE_DTYPES
            if len(shape) < 2 or tuple(s.shape) != quant.fp8_scale_shape(shape, grid) or s.dtype not in dtypes:
                what = f"blocks {list(scheme.block)}" if kind == "fp8" else f"groups of {quant.FP4_GROUP} inputs"
                raise CheckpointError(f"{kind.upper()} scale {s.dtype}{list(s.shape)} does not fit weight {shape} "
                                      f"with {what}", file=str(s.file), tensor=scale)
        elif info.dtype.startswith("F8") or name.endswith(QUANT_SUFFIXES):
            raise CheckpointError(QUANT_MESSAGE, **where)
        if targets is None or any(t not in params for t, _ in targets):
            raise CheckpointError("unexpected tensor: this model has no parameter for it", **where)
        if EXPERT_PARAM.fullmatch(targets[0][0]):
            expert_bytes += _nbytes(info) + (_nbytes(tensors[scale]) if scale else 0)
        integer = not params[targets[0][0]].dtype.is_floating_point
        if integer and info.dtype not in INT_DTYPES:
            raise CheckpointError(f"dtype {info.dtype} is not supported here (expected an integer table)", **where)
        if not integer and info.dtype not in FLOAT_DTYPES and not scale:
            raise CheckpointError(f"dtype {info.dtype} is not supported here (expected F32, F16 or BF16)", **where)
        try:
            pieces = split(torch.empty(shape, device="meta")) if split else (torch.empty(shape, device="meta"),)
        except (RuntimeError, ValueError):
            raise CheckpointError(f"{stored} is not a valid tensor shape here", **where) from None
        cut = None
        for (target, slot), piece in zip(targets, pieces, strict=True):
            p = params[target]
            ep = shards.get(target)
            full = p.shape[0] if ep is None else ep.experts  # expert slots of the whole model
            want = p.shape[1:] if slot is not None else (p.shape if ep is None else (full, *p.shape[1:]))
            if target in heads:  # tensor parallelism: the checkpoint holds every head
                dim, cut = heads[target][0], heads[target][:3]
                want = (*p.shape[:dim], heads[target][3], *p.shape[dim + 1:])
            if slot is not None and slot >= full:
                raise CheckpointError(f"expert {slot} is out of range (config has {full})", **where)
            if tuple(piece.shape) != tuple(want):
                raise CheckpointError(f"{stored} does not match the config (expects {list(want)} for {target})",
                                      **where)
            key = slot if slot is not None else -1
            if key in filled[target]:
                raise CheckpointError(f"a second tensor for {target}", **where)
            filled[target].add(key)
            if ep is not None and slot is None:
                cut = 0, ep.owned.start, ep.owned.stop
        if shards:
            if any(t in shards and slot is not None and slot not in shards[t].owned for t, slot in targets):
                continue  # another rank's expert: checked, not read
            targets = [(t, slot - shards[t].owned.start if t in shards and slot is not None else slot)
                       for t, slot in targets]
        plan[name] = targets, split, scale, cut
    for target, p in params.items():
        got = filled.get(target, set())
        need = {-1} if not got or -1 in got else set(range(shards[target].experts if target in shards else p.shape[0]))
        if got != need:
            missing = "all" if not got else sorted(need - got)
            raise CheckpointError(f"missing weights for parameter {target} (slots: {missing})",
                                  file=str(next(iter(tensors.values())).file.parent))
    return plan, expert_bytes


def _quant_kind(name: str, dtype: str, scheme: quant.Scheme | None) -> str | None:
    """"fp8", "fp4" or "mxfp4" for a tensor stored quantised under the config's scheme, else None."""
    if scheme is None:
        return None
    if scheme.mxfp4:
        return "mxfp4" if dtype == "U8" and name.endswith(quant.MX_SUFFIXES[0]) else None
    return "fp8" if dtype == "F8_E4M3" else "fp4" if dtype == "I8" and scheme.fp4_experts else None


def _nbytes(info: checkpoint.TensorInfo) -> int:
    return info.offsets[1] - info.offsets[0]


def _hold_quantised(model: CausalLM, tensors: dict[str, checkpoint.TensorInfo], plan: LoadPlan,
                    scheme: quant.Scheme, heads: dict[str, tuple[int, int, int, int]]) -> None:
    """Give the modules whose checkpoint tensors are all stored quantised in one format their codes and scales
    (empty, still on meta): routed experts (the three projections alike) and nn.Linear weights stored FP8, which
    become `BlockFP8Linear` (a tensor-parallel cut shrinks its block, `quant.cut_block`). Anything else quantised
    on disk is dequantised on load: FP8 tensors split between parameters (blocks may straddle the parts) and FP4
    scales stored as floats."""
    formats: dict[str, set[str | None]] = defaultdict(set)
    for name, (targets, split, scale, _) in plan.items():
        kind = _quant_kind(name, tensors[name].dtype, scheme) if scale else None
        if kind == "fp8" and split is not None or kind == "fp4" and tensors[scale].dtype != "F8_E8M0":
            kind = None
        for target, _ in targets:
            formats[target].add("fp4" if kind == "mxfp4" else kind)
    for name, module in list(model.named_modules()):
        if isinstance(module, Experts):
            kinds = set().union(*(formats[f"{name}.{p}"] for p in Experts.PROJECTIONS))
            if len(kinds) == 1 and None not in kinds:
                fp4 = kinds == {"fp4"}
                module.hold_quantised(fp4, quant.FP4_BLOCK if fp4 else scheme.block)
        elif isinstance(module, nn.Linear) and formats.get(f"{name}.weight") == {"fp8"}:
            cut = heads.get(f"{name}.weight")
            block = scheme.block if cut is None else quant.cut_block(scheme.block, cut[0], cut[2] - cut[1])
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, BlockFP8Linear(module, block))


def _copy(model: CausalLM, tensors: dict[str, checkpoint.TensorInfo], plan: LoadPlan,
          scheme: quant.Scheme | None, shards: dict[str, distributed.ExpertParallel]) -> dict[str, int]:
    """Stream tensors file by file through memory-mapped reads into the parameters: codes and scales of weights
    held quantised as they are, other quantised weights dequantised one at a time; returns the bytes read, in all
    and of routed experts, beside the checkpoint's totals."""
    params = dict(model.named_parameters())
    names = sorted(plan, key=lambda n: str(tensors[n].file))
    report = {"bytes_read": 0, "expert_bytes_read": 0}
    total = sum(_nbytes(tensors[n]) for n in names)
    with ExitStack() as stack, tqdm(total=total, unit="B", unit_scale=True, desc="loading",
                                    disable=total < 2**28) as bar:
        handles: dict[Path, object] = {}

        def read(name: str, expert: bool, cut: Cut | None = None) -> torch.Tensor:
            file = tensors[name].file
            try:
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                if cut is None:
                    t = handles[file].get_tensor(name)
                else:  # read only this rank's part
                    dim, a, b = cut
                    t = handles[file].get_slice(name)[(slice(None),) * dim + (slice(a, b),)]
            except (SafetensorError, OSError) as e:  # the file changed or vanished after its header was checked
                raise CheckpointError(f"cannot be read ({e})", file=str(file), tensor=name) from None
            report["bytes_read"] += t.numel() * t.element_size()
            report["expert_bytes_read"] += t.numel() * t.element_size() if expert else 0
            return t

        for name in names:
            targets, split, scale, cut = plan[name]
            expert = targets[0][0] in shards or EXPERT_PARAM.fullmatch(targets[0][0]) is not None
            held = scale is not None and f"{targets[0][0]}_scale" in params
            # block-scaled weights cut within a matrix (tensor parallelism) are read whole, then cut
            part = cut if scale is None or cut is None or cut[0] < len(tensors[name].shape) - 2 else None
            t = read(name, expert, part)
            bar.update(t.numel() * t.element_size())
            s = None
            if scale:
                s = read(scale, expert, part)
                value = quant.e8m0(s)
                if not (torch.isfinite(value).all() and (value >= 0).all()):
                    raise CheckpointError("scales must be finite and non-negative",
                                          file=str(tensors[scale].file), tensor=scale)
                fp8 = t.dtype == quant.FP8
                t = t if fp8 else quant.mxfp4_codes(t) if name.endswith(quant.MX_SUFFIXES[0]) else t.view(torch.uint8)
                block = scheme.block if fp8 else quant.FP4_BLOCK
                if held:
                    if fp8 and ((t.view(torch.uint8) & 0x7F) == 0x7F).any():
                        raise CheckpointError("weights contain NaN or Inf", file=str(tensors[name].file), tensor=name)
                    s = value if fp8 else s.view(torch.uint8)
                    if cut is not None and part is None:
                        t, s, _ = quant.cut_fp8(t, s, block, *cut)
                else:
                    t = quant.dequantize(t, s, block)
                    if cut is not None and part is None:
                        t = t.narrow(cut[0], cut[1], cut[2] - cut[1])
            if not held and not torch.isfinite(t).all():
                raise CheckpointError("weights contain NaN or Inf", file=str(tensors[name].file), tensor=name)
            bound = model.index_tables.get(targets[0][0])
            if bound is not None and t.numel() and not 0 <= int(t.min()) <= int(t.max()) < bound:
                raise CheckpointError(f"values must lie in [0, {bound}), found {int(t.min())}..{int(t.max())}",
                                      file=str(tensors[name].file), tensor=name)
            pieces = split(t) if split else (t,)
            scales = (split(s) if split else (s,)) if held else (None,) * len(pieces)
            for (target, slot), piece, piece_scale in zip(targets, pieces, scales):
                for dst, src in ((target, piece), (f"{target}_scale", piece_scale)):
                    if src is not None:
                        (params[dst].data if slot is None else params[dst].data[slot]).copy_(src)
    return report
