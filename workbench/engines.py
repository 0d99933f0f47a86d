"""Routing dumps of serving engines as routing Datasets: the expert ids vLLM or SGLang report for each token and
MoE layer become the Dataset `analysis.from_cache` builds (docs/references.md, "Engine routing dumps"), so that
every analysis, `analysis.compare` and `interventions.replay` take an engine's routing like one of our traces.

A dump holds expert ids only, no weights: the Dataset has no `topk_weights` (analyses that need weights say so).
Its layer axis is either one row per MoE layer or, as both engines' capture buffers are laid out, one row per
decoder layer (a dense layer's rows never written, so they read expert 0). `layers=` names the checkpoint's MoE
layer numbers: with one per row they label the rows in order, with fewer the rows at those layer numbers are kept.
Without it the rows are taken as layers 0..n-1, all routed (the Dataset's `layers_assumed` attr says so).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .analysis import from_cache
from .analysis.dataset import as_numpy
from .errors import InputError


def read_vllm(routed_experts: Any, input_ids: Any, *, n_experts: int,
              layers: Sequence[int] | None = None) -> xr.Dataset:
    """The routing Dataset of a vLLM dump (`--enable-return-routed-experts`: `RequestOutput.prompt_routed_experts`
    and `CompletionOutput.routed_experts`, integer ids [tokens, layers, k]; concatenate the two for a whole
    sequence) or any [tokens, layers, k] array of ids, with `input_ids` the tokens its rows belong to."""
    return _dataset(_integer_array(routed_experts, "vllm"), input_ids, n_experts, layers, "vllm")


def read_sglang(routed_experts: Any, input_ids: Any, *, n_experts: int, k: int | None = None,
                layers: Sequence[int] | None = None) -> xr.Dataset:
    """The routing Dataset of an SGLang dump (`return_routed_experts`: `meta_info["routed_experts"]`, base64 of
    int32 [tokens, layers, k]; `k`, the experts per token, unflattens it) or of the decoded array. Its rows cover
    every token fed to the model: the prompt and all generated tokens but the last."""
    if isinstance(routed_experts, (str, bytes)):
        if k is None or k < 1:
            raise InputError("sglang: pass k= (experts per token) to unflatten a base64 routed_experts dump")
        try:
            raw = base64.b64decode(routed_experts, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"sglang: routed_experts is not valid base64 ({e})") from None
        n = len(_token_ids(input_ids, "sglang"))
        if len(raw) % 4 or (len(raw) // 4) % max(n * k, 1):
            raise InputError(f"sglang: routed_experts decodes to {len(raw)} bytes, not int32 ids [{n} tokens, layers, "
                             f"k={k}] ({n * k * 4} bytes per layer)")
        dump = np.frombuffer(raw, dtype="<i4").reshape(n, -1, k)
    else:
        dump = _integer_array(routed_experts, "sglang")
        if k is not None and dump.ndim == 3 and dump.shape[-1] != k:
            raise InputError(f"sglang: routed_experts has k={dump.shape[-1]} experts per token, k={k} was passed")
    return _dataset(dump, input_ids, n_experts, layers, "sglang")


def _integer_array(x: Any, engine: str) -> np.ndarray:
    """`x` as a numpy array of integer ids (lists, numpy and torch); floats, bools and objects refused."""
    a = as_numpy(x)
    if a.dtype.kind not in "iu":
        raise InputError(f"{engine}: routed_experts must hold integer expert ids, got dtype {a.dtype}")
    return a


def _token_ids(input_ids: Any, engine: str) -> np.ndarray:
    ids = as_numpy(input_ids)
    ids = ids[0] if ids.ndim == 2 and ids.shape[0] == 1 else ids
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InputError(f"{engine}: input_ids must be one sequence of integer token ids [T], got {ids.dtype} of "
                         f"shape {list(ids.shape)}")
    return ids


def _layer_rows(n_rows: int, layers: Sequence[int] | None, engine: str) -> tuple[list[int], list[int]]:
    """(rows of the dump to keep, the checkpoint layer number of each)."""
    if layers is None:
        return list(range(n_rows)), list(range(n_rows))
    numbers = [int(x) for x in layers]
    if not numbers or min(numbers) < 0 or sorted(set(numbers)) != numbers:
        raise InputError(f"{engine}: layers must be distinct increasing layer numbers >= 0, got {numbers}")
    if len(numbers) == n_rows:
        return list(range(n_rows)), numbers
    if numbers[-1] < n_rows:
        return numbers, numbers
    raise InputError(f"{engine}: the dump has {n_rows} layer rows: neither one per MoE layer of layers={numbers} "
                     f"({len(numbers)}) nor one per decoder layer up to layer {numbers[-1]}")


def _dataset(dump: np.ndarray, input_ids: Any, n_experts: int, layers: Sequence[int] | None,
             engine: str) -> xr.Dataset:
    """The checked dump [T, rows, k] as the Dataset `from_cache` builds."""
    ids = _token_ids(input_ids, engine)
    if dump.ndim != 3 or 0 in dump.shape:
        raise InputError(f"{engine}: routed_experts must be ids [tokens, layers, k], got shape {list(dump.shape)}")
    if dump.shape[0] != len(ids):
        raise InputError(f"{engine}: routed_experts covers {dump.shape[0]} tokens, input_ids has {len(ids)}; pass the "
                         "ids of the tokens the engine forwarded (it never routes the last generated token)")
    if n_experts < 1 or n_experts > np.iinfo(np.int16).max:
        raise InputError(f"{engine}: n_experts must be between 1 and {np.iinfo(np.int16).max}, got {n_experts}")
    rows, numbers = _layer_rows(dump.shape[1], layers, engine)
    dump = dump[:, rows]
    bad = np.argwhere((dump < 0) | (dump >= n_experts))
    if len(bad):
        t, j, r = bad[0]
        raise InputError(f"{engine}: expert id {int(dump[t, j, r])} at token {t}, layer {numbers[j]} is outside "
                         f"[0, {n_experts}) ({len(bad)} ids out of range)")
    ordered = np.sort(dump, axis=-1)
    repeats = np.argwhere((ordered[..., 1:] == ordered[..., :-1]).any(-1))
    if len(repeats):
        t, j = repeats[0]
        raise InputError(f"{engine}: token {t} at layer {numbers[j]} repeats an expert ({dump[t, j].tolist()}); a "
                         "router picks k distinct experts (a dense layer's rows read 0: pass layers= the MoE layers)")
    cache = {f"layers.{n}.router.topk_ids": dump[None, :, j] for j, n in enumerate(numbers)}
    ds = from_cache(cache, ids, n_experts=n_experts)
    ds.attrs.update(engine=engine, layers_assumed=layers is None)
    return ds
