"""`workbench.load`: checkpoint folder or hub repo -> a hookable model with its weights, checked first."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import checkpoint
from .config import Config
from .errors import CheckpointError
from .models import family
from .models.base import CausalLM, Split, Targets, map_tensor
from .tokenizer import load_tokenizer

BACKENDS = ("auto", "torch")
FLOAT_DTYPES = {"F32", "F16", "BF16"}
QUANT_SUFFIXES = ("_blocks", "_scales", "weight_scale_inv", ".scale")
QUANT_MESSAGE = "quantised weights (MXFP4 / FP8 with scales) are not supported yet; use a bf16 or fp32 checkpoint"
KEEP_FP32 = ("correction_bias",)  # selection-only biases stay fp32 whatever the model dtype


def load(
    source: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    backend: str = "auto",
) -> CausalLM:
    """Load a Hugging Face MoE (or dense) checkpoint from a local folder or a hub repo id.

    Every safetensors header and tensor shape is checked against the config before any weight is
    read; anything wrong raises `CheckpointError` naming the file and tensor. Pickle files are never
    opened and code shipped with a checkpoint is never run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available; choose from {', '.join(BACKENDS)}")
    folder, commit = checkpoint.resolve(source, revision)
    cfg = Config.read(folder / "config.json")
    checkpoint.warn_about_code(folder, cfg.data)
    fam = family(cfg)
    tensors = checkpoint.weight_files(folder)
    with torch.device("meta"):
        model = fam.build(cfg)
    dtype = dtype or cfg.dtype
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if name.endswith(KEEP_FP32) else dtype)
    plan = _plan(model, tensors, fam.rules(cfg))
    try:
        tokenizer = load_tokenizer(folder, model.vocab_size)
    except Exception as e:  # tokenizers raises its own exception type for malformed files
        raise CheckpointError(f"unreadable tokenizer ({e})", file=str(folder / "tokenizer.json")) from None
    model.to_empty(device=device or "cpu")
    model.tie_weights()
    _copy(model, tensors, plan)
    model.eval().requires_grad_(False)
    model.source, model.revision, model.commit = str(source), revision, commit
    model.checkpoint_dir, model.tokenizer = folder, tokenizer
    return model


Plan = dict[str, tuple[Targets, Split | None]]  # checkpoint tensor -> our (parameter, slot)s and its split


def _plan(model: CausalLM, tensors: dict[str, checkpoint.TensorInfo], rules) -> Plan:
    """Map every checkpoint tensor onto our parameters and check shapes and coverage, reading no data."""
    params = dict(model.named_parameters())
    if model.tied:
        params.pop("lm_head.weight", None)
    filled: dict[str, set] = defaultdict(set)
    plan: Plan = {}
    for name, info in tensors.items():
        where = dict(file=str(info.file), tensor=name)
        mapped = map_tensor(rules, name)
        targets, split = mapped or (None, None)
        if targets == [] or (model.tied and targets == [("lm_head.weight", None)]):
            continue  # deliberately skipped (e.g. MTP layers), or a tied head saved beside the embedding
        if info.dtype.startswith("F8") or name.endswith(QUANT_SUFFIXES):
            raise CheckpointError(QUANT_MESSAGE, **where)
        if targets is None or any(t not in params for t, _ in targets):
            raise CheckpointError("unexpected tensor: this model has no parameter for it", **where)
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"dtype {info.dtype} is not supported here (expected F32, F16 or BF16)", **where)
        pieces = split(torch.empty(info.shape, device="meta")) if split else (torch.empty(info.shape, device="meta"),)
        for (target, slot), piece in zip(targets, pieces, strict=True):
            p = params[target]
            want = p.shape if slot is None else p.shape[1:]
            if slot is not None and slot >= p.shape[0]:
                raise CheckpointError(f"expert {slot} is out of range (config has {p.shape[0]})", **where)
            if tuple(piece.shape) != tuple(want):
                raise CheckpointError(f"shape {list(info.shape)} does not match the config "
                                      f"(expects {list(want)} for {target})", **where)
            key = slot if slot is not None else -1
            if key in filled[target]:
                raise CheckpointError(f"a second tensor for {target}", **where)
            filled[target].add(key)
        plan[name] = targets, split
    for target, p in params.items():
        got = filled.get(target, set())
        need = {-1} if not got or -1 in got else set(range(p.shape[0]))
        if got != need:
            missing = "all" if not got else sorted(need - got)
            raise CheckpointError(f"missing weights for parameter {target} (slots: {missing})",
                                  file=str(next(iter(tensors.values())).file.parent))
    return plan


def _copy(model: CausalLM, tensors: dict[str, checkpoint.TensorInfo], plan: Plan) -> None:
    """Stream tensors file by file through memory-mapped reads into the model's parameters."""
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in plan:
        by_file[tensors[name].file].append(name)
    total = sum(f.stat().st_size for f in by_file)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=total < 2**28) as bar:
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    t = f.get_tensor(name)
                    if not torch.isfinite(t).all():
                        raise CheckpointError("weights contain NaN or Inf", file=str(file), tensor=name)
                    targets, split = plan[name]
                    for (target, slot), piece in zip(targets, split(t) if split else (t,)):
                        dst = params[target].data if slot is None else params[target].data[slot]
                        dst.copy_(piece)
                    bar.update(t.numel() * t.element_size())
