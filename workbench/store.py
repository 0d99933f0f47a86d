"""Streaming activation store: `trace` runs one long sequence chunk by chunk through a model and writes what
its hooks see to a zarr v3 store; `open_store` reads it back as an xarray Dataset lazily backed by dask.

Schema (DESIGN.md, "Store schema"):
- dims `token` and `layer`, both coordinates: the absolute token position and the checkpoint's own layer
  numbers (the routed layers plus the layers of any named hook); `k`; and per-hook trailing dims `hidden`
  (`hc`, `hidden` under hyper-connections), `expert`, `intermediate` (per-expert hidden) and `vocab`.
  A trailing dim whose size clashes with a dim of that name is prefixed with its variable's name.
- `input_ids(token)` int32, and the routing of every routed layer at every token: `topk_ids(layer, token, k)`
  int16 (fill -1) and `topk_weights(layer, token, k)` float16 (fill NaN). float16 keeps 11 significant bits
  (relative error <= 2**-11), ample for weights between 0 and the routed scaling factor; it halves float32's
  bytes and, unlike bfloat16, is native to numpy, zarr and xarray.
- A named hook `layers.{i}.a.b` is stored as variable `a_b(layer, token, ...)`; one outside the layers
  (`final.norm_out`, `logits`) as `final_norm_out(token, ...)`: dots become underscores, bfloat16 becomes
  float32, each variable's `hook` attr names its source. Layers a variable does not cover (dense layers in
  `topk_*`) and tokens outside `windows` read as the fill value and take no space on disk.
- Root attrs: provenance (source, revision, commit, sha256 of every weight file, config hash, versions, seed,
  chunking, names), the progress marker `committed_tokens`, `complete`, and the last run's `summary`.
- Chunks: one layer by up to `chunk_tokens` tokens (fewer where a row is wide, about 1 MiB uncompressed),
  compressed with blosc zstd over byte-shuffled values: one write per trace chunk, cheap reads of a token range.

Crash safety: zarr writes every file to a temporary name and renames it into place, so a file is either old
or new, never torn. A trace chunk writes all its arrays first and the marker `committed_tokens` (root
metadata) last; readers trim every variable to the marker, so a chunk whose marker was never written is
invisible, and resume rewrites it. Resume rebuilds the attention state by replaying the committed prefix
with the same hooks registered chunk by chunk (some hooks select different kernels) and their values
dropped, so the continued forward is exactly the uninterrupted one; a snapshot of a full-attention state
would cost bytes proportional to the whole prefix at every chunk. One writer at a time: it holds an exclusive
flock on the store directory, which the OS releases when the writer dies. Covered: process death at any
point (SIGKILL); not covered: power loss (nothing is fsynced).

Test hook: `WORKBENCH_TRACE_CRASH=CHUNK:POINT` makes the writer SIGKILL itself at POINT (`forward`, `write`,
`marker` or `committed`) of trace chunk number CHUNK.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import errno
import fcntl
import fnmatch
import hashlib
import json
import operator
import os
import platform
import resource
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec

from . import distributed, publish
from .checkpoint import sha256
from .errors import HookError
from .models.base import CausalLM, State

if TYPE_CHECKING:
    import xarray

FORMAT = 1
CRASH_ENV = "WORKBENCH_TRACE_CRASH"
CHUNK_BYTES = 1 << 20  # target uncompressed bytes of one stored chunk
TOPK_IDS, TOPK_WEIGHTS = "router.topk_ids", "router.topk_weights"
ROUTING = (TOPK_IDS, TOPK_WEIGHTS)
# root attrs that must match for a trace to resume a store
IDENTITY = ("workbench_store", "weights_sha256", "config_sha256", "dtype", "tokens_total", "tokens_sha256",
            "names", "layers", "windows", "chunk_tokens")
# trailing dim names per hook (right-aligned: resid [H] -> hidden, [hc, H] -> hc, hidden)
_HIDDEN = ("hc", "hidden")
TRAILING_DIMS = {
    **{s: _HIDDEN for s in ("resid_pre", "resid_mid", "resid_post", "attn.out", "shared.out", "moe.out",
                            "mlp.out", "final.norm_out")},
    "router.logits": ("expert",), "router.scores": ("expert",),
    "experts.hidden": ("k", "intermediate"), "experts.out": ("k", "hidden"), "logits": ("vocab",),
}


class StoreError(ValueError):
    """A store cannot be written or read as asked; the message says why and what to do instead."""


@dataclass
class Variable:
    """One stored data variable: the hooks that fill it (each at its index on the layer axis) and its layout."""

    name: str
    hooks: dict[str, int | None]  # hook name -> index on the layer axis; None: no layer axis
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    fill: Any
    windows: list[tuple[int, int]] | None  # token ranges recorded; None: every token
    hook: str  # the hook name pattern, `layers.{layer}.` standing for the layer

    @property
    def layered(self) -> bool:
        return self.dims[0] == "layer"

    def spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The token ranges of [start, stop) this variable records."""
        if self.windows is None:
            return [(start, stop)]
        return [(max(a, start), min(b, stop)) for a, b in self.windows if a < stop and b > start]


@dataclass
class Plan:
    """What a trace records: the layer coordinate and the variables, routing first."""

    layers: list[int]
    routed: list[int]
    k: int
    experts: int | None
    chunk_tokens: int  # tokens per forward chunk (and per commit)
    token_chunk: int  # stored chunk length of `input_ids` and `token`
    variables: list[Variable]


def trace(
    model: CausalLM,
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    out: str | Path,
    *,
    names: Iterable[str] | str | None = None,
    chunk_tokens: int = 8192,
    layers: Iterable[int] | None = None,
    windows: Iterable[tuple[int, int]] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    seed: int | None = None,
) -> Path:
    """Run `tokens` (one sequence) through `model` chunk by chunk and stream routing, plus the hooks named
    by glob in `names` (restricted to `layers` and token `windows`), to the zarr store `out`.

    An incomplete store at `out` from the same model, tokens and arguments is resumed (resume=True); a
    complete one is refused unless overwrite=True. `seed` is recorded as the seed that made `tokens`.
    The run's summary lands in the store's attrs (`open_store(out).attrs["summary"]`).
    """
    t0 = time.perf_counter()
    parallel = model.parallel is not None
    writer = not parallel or model.parallel.rank == 0  # expert-parallel ranks run the forward, rank 0 writes
    with contextlib.ExitStack() as stack:
        with distributed.agreed(parallel):
            ids = _check_tokens(tokens, model.vocab_size)
            chunk_tokens = _positive_int(chunk_tokens, "chunk_tokens")
            windows = _check_windows(windows, len(ids))
            patterns = [names] if isinstance(names, str) else list(names or [])
            layers = None if layers is None else sorted({_integer(x, "a layer number") for x in layers})
            plan = _plan(model, ids, _select(model, patterns, layers), windows, chunk_tokens)
            out = Path(out).expanduser()
            root, start = None, 0
            if writer:
                _existing_attrs(out)  # refuse a path that holds something else before creating anything there
                stack.enter_context(_write_lock(out))
                attrs = _existing_attrs(out)
                if attrs is not None and not overwrite:
                    _check_format(out, attrs, "pass overwrite=True (CLI: --overwrite) to replace it, or write "
                                  "elsewhere")
                if attrs is not None and attrs.get("complete") and not overwrite:
                    raise StoreError(f"{out} already holds a complete trace; pass overwrite=True (CLI: "
                                     "--overwrite) to replace it")
                prov = _provenance(model, ids, seed, patterns, layers, windows, chunk_tokens, plan, progress)
                root, start = _prepare(out, attrs, prov, plan, resume, overwrite)
        if parallel:
            start = distributed.broadcast_int(start)
        _run(model, ids, out, root, plan, start, progress and writer, t0)
    if writer:
        publish.record_store(out, seed)  # only under `workbench publish` / `verify`: the routing hash
    return out


def open_store(path: str | Path) -> xarray.Dataset:
    """The store at `path` as an xarray Dataset backed by dask (one task per stored chunk), trimmed to the
    committed tokens, provenance in `ds.attrs`."""
    import xarray as xr

    path = Path(path).expanduser()
    attrs = _existing_attrs(path)
    if attrs is None:
        raise StoreError(f"{path}: no store here")
    _check_format(path, attrs, "open it with a workbench version that reads it")
    with warnings.catch_warnings(), _io_errors(path, "reading the store"):
        # temporaries a killed writer left behind, removed when it is resumed
        warnings.filterwarnings("ignore", message=r"Object at .*\.partial is not recognized")
        ds = xr.open_zarr(path, consolidated=False, chunks={})
    return ds.isel(token=slice(0, ds.attrs["committed_tokens"])) if "token" in ds.dims else ds


def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a store or one of its variables (every file below `path`)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------- arguments


def _integer(x: Any, what: str) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {x!r}") from None


def _positive_int(x: Any, what: str) -> int:
    n = _integer(x, what)
    if n < 1:
        raise ValueError(f"{what} must be at least 1, got {n}")
    return n


def _check_tokens(tokens: Any, vocab: int) -> np.ndarray:
    """One sequence of token ids as int64, every id inside the vocabulary."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    ids = np.asarray(tokens)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"tokens must be one sequence, shape [T] or [1, T]; got shape {list(ids.shape)}")
    if ids.size == 0:
        raise ValueError("tokens is empty: nothing to trace")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integer ids, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        raise ValueError(f"token id {ids[bad[0]]} at position {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids.astype(np.int64)


def _check_windows(windows: Iterable[tuple[int, int]] | None, n: int) -> list[tuple[int, int]] | None:
    if windows is None:
        return None
    out = []
    for w in windows:
        try:
            a, b = (operator.index(x) for x in w)
        except (TypeError, ValueError):
            raise ValueError(f"window {w!r} must be a (start, stop) pair of token positions") from None
        if not 0 <= a < b <= n:
            raise ValueError(f"window ({a}, {b}) must satisfy 0 <= start < stop <= {n} (the number of tokens)")
        out.append((a, b))
    if not out:
        raise ValueError("windows is empty; pass None to record the named hooks at every token")
    return sorted(out)


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def _select(model: CausalLM, patterns: list[str], layers: list[int] | None) -> list[str]:
    """The hook points named by `patterns` (globs), within `layers`, routing left out (always recorded)."""
    hook_names = model.hook_names
    chosen: dict[str, None] = {}
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"names must be hook names or globs (strings), got {pattern!r}")
        found = [n for n in hook_names if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            close = difflib.get_close_matches(pattern, hook_names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see model.hook_names"
            raise HookError(f"no hook point matches {pattern!r}{hint}")
        chosen.update((n, None) for n in found if not n.endswith(ROUTING))
    if layers is not None:
        have = sorted({i for i in map(_layer, hook_names) if i is not None})
        missing = [i for i in layers if i not in have]
        if missing:
            raise ValueError(f"layers {missing} are not in this model (it has layers {have[0]} to {have[-1]})")
        kept = [n for n in chosen if _layer(n) is None or _layer(n) in layers]
        if chosen and not kept:
            raise ValueError(f"names {patterns} select no hook point in layers {layers}")
        return kept
    return list(chosen)


# ---------------------------------------------------------------- plan and provenance


def trailing_dims(var: str, names: tuple[str, ...], trailing: tuple[int, ...], sizes: dict[str, int]) -> list[str]:
    """Dim names of variable `var`'s trailing axes: the last of `names` (the hook kind's), else `{var}_dim{j}`; a
    name already sized differently in `sizes` becomes `{var}_{name}`. Records the sizes it uses in `sizes`."""
    dims = list(names[len(names) - len(trailing):] if len(trailing) <= len(names) else
                [f"{var}_dim{j}" for j in range(len(trailing))])
    for j, (d, size) in enumerate(zip(dims, trailing)):
        if sizes.setdefault(d, size) != size:
            dims[j] = f"{var}_{d}"
            sizes[dims[j]] = size
    return dims


def _var_name(hook: str) -> tuple[str, str]:
    """(variable name, hook key without the layer prefix) of a hook point."""
    key = hook.split(".", 2)[2] if _layer(hook) is not None else hook
    return key.replace(".", "_"), key


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype == torch.bfloat16:
        return np.dtype(np.float32)
    return torch.empty(0, dtype=dtype).numpy().dtype


def _fill(dtype: np.dtype) -> Any:
    return np.nan if dtype.kind == "f" else -1 if dtype.kind == "i" else 0


def _rows(row_bytes: int, chunk_tokens: int) -> int:
    """Tokens per stored chunk: a power of two near CHUNK_BYTES uncompressed, at most one trace chunk."""
    return min(chunk_tokens, 1 << max(0, (CHUNK_BYTES // max(row_bytes, 1)).bit_length() - 1))


def _plan(model: CausalLM, ids: np.ndarray, chosen: list[str], windows: list[tuple[int, int]] | None,
          chunk_tokens: int) -> Plan:
    """Lay out the store; one forward over the first token tells every hook's trailing shape and dtype."""
    hook_names = model.hook_names
    routing = {kind: [n for n in hook_names if n.endswith("." + kind)] for kind in ROUTING}
    routed = [_layer(n) for n in routing[TOPK_IDS]]
    logits = [f"layers.{i}.router.logits" for i in routed if f"layers.{i}.router.logits" in hook_names]
    probe = [*routing[TOPK_IDS], *routing[TOPK_WEIGHTS], *logits, *chosen]
    seen = model.run_with_cache(torch.as_tensor(ids[:1])[None], names=probe)[1] if probe else {}
    silent = [n for n in probe if n not in seen]
    if silent:
        raise StoreError(f"hook points {silent} did not fire in a forward pass; they cannot be traced")
    layer_coord = sorted(set(routed) | {i for i in map(_layer, chosen) if i is not None})
    index = {layer: j for j, layer in enumerate(layer_coord)}
    n, L = len(ids), len(layer_coord)
    sizes = {"token": n, "layer": L}
    variables = []
    ks = {seen[name].shape[-1] for name in routing[TOPK_IDS]}
    if len(ks) > 1:
        raise StoreError(f"routed layers select different numbers of experts ({sorted(ks)}); not supported")
    k = ks.pop() if ks else 0
    experts = seen[logits[0]].shape[-1] if logits else None
    if experts is not None and experts > np.iinfo(np.int16).max:
        raise StoreError(f"{experts} experts do not fit the int16 topk_ids")
    if routed:
        sizes["k"] = k
        # a routing chunk holds every layer: analyses read all layers of a token block at once (one chunk
        # instead of L), and a single layer's slice still decodes only a few kB per 1,000 tokens
        rows = _rows(L * k * 2, chunk_tokens)
        for kind, var, dtype in ((TOPK_IDS, "topk_ids", np.dtype(np.int16)),
                                 (TOPK_WEIGHTS, "topk_weights", np.dtype(np.float16))):
            variables.append(Variable(var, {h: index[_layer(h)] for h in routing[kind]}, ("layer", "token", "k"),
                                      (L, n, k), (L, rows, k), dtype, _fill(dtype), None, f"layers.{{layer}}.{kind}"))
    groups: dict[str, list[str]] = {}
    for hook in chosen:
        groups.setdefault(_var_name(hook)[0], []).append(hook)
    for var, hooks in groups.items():
        key = _var_name(hooks[0])[1]
        kinds = {(tuple(seen[h].shape[2:]), seen[h].dtype) for h in hooks}
        if len(kinds) > 1:
            raise StoreError(f"hook points {hooks} differ in shape or dtype; name them in separate traces")
        trailing = tuple(seen[hooks[0]].shape[2:])
        dtype = _numpy_dtype(seen[hooks[0]].dtype)
        dims = trailing_dims(var, TRAILING_DIMS.get(key, ()), trailing, sizes)
        rows = _rows(int(np.prod(trailing, dtype=np.int64)) * dtype.itemsize, chunk_tokens)
        layered = _layer(hooks[0]) is not None
        lead = ("layer", "token") if layered else ("token",)
        variables.append(Variable(
            var, {h: index[_layer(h)] if layered else None for h in hooks}, (*lead, *dims),
            ((L,) if layered else ()) + (n, *trailing), ((1,) if layered else ()) + (rows, *trailing),
            dtype, _fill(dtype), windows, f"layers.{{layer}}.{key}" if layered else key))
    return Plan(layer_coord, routed, k, experts, chunk_tokens, _rows(8, chunk_tokens), variables)


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
            "xarray": metadata.version("xarray"), "dask": metadata.version("dask"), "numpy": np.__version__}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _provenance(model: CausalLM, ids: np.ndarray, seed: int | None, names: list[str], layers: list[int] | None,
                windows: list[tuple[int, int]] | None, chunk_tokens: int, plan: Plan, progress: bool) -> dict:
    """The root attrs of a new store, normalised to what JSON gives back."""
    import workbench

    folder = getattr(model, "checkpoint_dir", None)
    files = sorted(Path(folder).glob("*.safetensors")) if folder else []
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing weights",
              disable=not progress or total < 2**30) as bar:
        weights = {}
        for f in files:  # the loader's digests, remembered per file: a checkpoint verified on load is not reread
            weights[f.name] = sha256(f)
            bar.update(f.stat().st_size)
    attrs = {
        "workbench_store": FORMAT,
        "source": model.source, "revision": model.revision, "commit": model.commit,
        "model_type": model.config.get("model_type"),
        "weights_sha256": weights,
        "config_sha256": hashlib.sha256(json.dumps(model.config.data, sort_keys=True).encode()).hexdigest(),
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "device": str(model.embed.weight.device),
        "torch_threads": torch.get_num_threads(),
        "world_size": 1 if model.parallel is None else model.parallel.world,
        "backend": model.backend,
        "workbench_version": workbench.__version__,
        "versions": _versions(),
        "seed": seed,
        "tokens_total": len(ids),
        "tokens_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest(),
        "names": names, "layers": layers, "windows": windows,
        "chunk_tokens": chunk_tokens,
        "chunks": {v.name: v.chunks for v in plan.variables},
        "routed_layers": plan.routed, "k": plan.k, "n_experts": plan.experts,
        "created": _now(),
        "committed_tokens": 0, "complete": False,
    }
    return json.loads(json.dumps(attrs))


# ---------------------------------------------------------------- the store on disk


def _existing_attrs(out: Path) -> dict | None:
    """Root attrs of the store at `out`; None where there is nothing to keep. Refuses anything else."""
    with _io_errors(out, "reading the store"):
        if not out.exists():
            return None
        if not out.is_dir():
            raise StoreError(f"{out} exists and is not a directory")
        if all(p.name.endswith(".partial") for p in out.iterdir()):
            return None
        try:
            attrs = zarr.open_group(out, mode="r").attrs.asdict()
        except (FileNotFoundError, ValueError):
            attrs = {}
    if "workbench_store" not in attrs:
        raise StoreError(f"{out} is not empty and is not a workbench store; refusing to touch it")
    return attrs


def _check_format(out: Path, attrs: dict, remedy: str) -> None:
    """Refuse a store written in another format version of this schema than the one this code reads and writes."""
    version = attrs.get("workbench_store")
    if version != FORMAT:
        raise StoreError(f"{out} is a workbench store of format {version!r}; this workbench reads and writes "
                         f"format {FORMAT}: {remedy}")


def _committed_on_disk(out: Path) -> int | None:
    """The committed-tokens marker as last written, or None where it cannot be read."""
    try:
        return int(json.loads((out / "zarr.json").read_text())["attributes"]["committed_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _io_errors(out: Path, doing: str) -> Iterator[None]:
    """Turn an OS error of the block (disk full, permission denied, ...) into a StoreError saying what failed,
    how far the store got and how to go on; the marker is written last, so the store holds only whole chunks."""
    try:
        yield
    except OSError as e:
        if isinstance(e, BlockingIOError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why, remedy = "no space left on the device", "Free some space (or write elsewhere)"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why, remedy = "permission denied", "Make the store's directory writable (or write elsewhere)"
        else:
            why, remedy = e.strerror or str(e), "Fix the cause"
        where = f" at {e.filename}" if e.filename else ""
        done = _committed_on_disk(out)
        progress = (f"; {done:,} tokens stay committed, readers see only those, and rerunning the same trace "
                    "resumes after them" if done else "")
        raise StoreError(f"{out}: {doing} failed: {why}{where}{progress}. {remedy}, then rerun") from e


@contextlib.contextmanager
def _write_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on the store directory for the block; another holder is another live writer."""
    with _io_errors(out, "creating the store"):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{out} is being written by another live trace; wait for it to finish or stop it "
                             "(a killed writer's lock goes with it)") from None
        yield
    finally:
        os.close(fd)


def _clear(out: Path) -> None:
    """Empty the store directory (itself stays: it carries the writer's lock)."""
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _prepare(out: Path, attrs: dict | None, prov: dict, plan: Plan, resume: bool,
             overwrite: bool) -> tuple[zarr.Group, int]:
    """Open the incomplete store with root `attrs` to resume it, or create it afresh; returns the root group
    and the first token to trace."""
    with _io_errors(out, "preparing the store"):
        return _open_or_create(out, attrs, prov, plan, resume, overwrite)


def _open_or_create(out: Path, attrs: dict | None, prov: dict, plan: Plan, resume: bool,
                    overwrite: bool) -> tuple[zarr.Group, int]:
    if attrs is not None and not overwrite:
        committed = attrs.get("committed_tokens", 0)
        if committed > 0:
            if not resume:
                raise StoreError(f"{out} holds an incomplete trace ({committed:,} of {attrs['tokens_total']:,} "
                                 "tokens); pass resume=True to continue it or overwrite=True to replace it")
            differ = [key for key in IDENTITY if attrs.get(key) != prov[key]]
            if differ:
                raise StoreError(f"{out} was started by a different trace (its {', '.join(differ)} differ); "
                                 "pass overwrite=True (CLI: --overwrite) to replace it, or write elsewhere")
            changed = [key for key in ("versions", "device", "torch_threads", "world_size", "backend")
                       if attrs.get(key, {"world_size": 1, "backend": "torch"}.get(key)) != prov[key]]
            if changed:
                warnings.warn(f"{out}: resuming with a different {' and '.join(changed)} than the trace started "
                              "with; the result may differ from an uninterrupted run", stacklevel=3)
            for p in out.rglob("*.partial"):  # temporaries of a write the last writer did not finish
                p.unlink()
            return zarr.open_group(out, mode="r+"), committed
    _clear(out)
    return _create(out, prov, plan), 0


def _create(out: Path, prov: dict, plan: Plan) -> zarr.Group:
    """A new store with every array laid out and nothing committed."""
    root = zarr.create_group(out, zarr_format=3, attributes=prov)
    codec = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    n = prov["tokens_total"]
    if plan.layers:
        root.create_array("layer", data=np.asarray(plan.layers, dtype=np.int64), dimension_names=("layer",))
    for name, dtype in (("token", np.int64), ("input_ids", np.int32)):
        root.create_array(name, shape=(n,), chunks=(plan.token_chunk,), dtype=dtype, fill_value=-1,
                          compressors=codec, dimension_names=("token",))
    for v in plan.variables:
        root.create_array(v.name, shape=v.shape, chunks=v.chunks, dtype=v.dtype, fill_value=v.fill,
                          compressors=codec, dimension_names=v.dims, attributes={"hook": v.hook})
    return root


# ---------------------------------------------------------------- the run


def _crash_point() -> tuple[int, str] | None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    chunk, point = spec.split(":")
    return int(chunk), point


def _crash_here(crash: tuple[int, str] | None, chunk: int, point: str) -> None:
    if crash == (chunk, point):
        os.kill(os.getpid(), signal.SIGKILL)


def _capture(sink: dict | None, start: int, spans: list[tuple[int, int]]):
    """A hook keeping copies of the `spans` of its tensor (batch row 0) in `sink`; None: keep nothing."""
    def keep(x: torch.Tensor, ctx) -> None:
        if sink is not None:
            sink[ctx.name] = [x[0, a - start:b - start].detach().to("cpu", copy=True) for a, b in spans]
    return keep


def _hooks(plan: Plan, start: int, stop: int, sink: dict | None) -> list:
    pairs = []
    for v in plan.variables:
        spans = v.spans(start, stop)
        if spans:
            fn = _capture(sink, start, spans)
            pairs += [(hook, fn) for hook in v.hooks]
    return pairs


def _as_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().astype(dtype, copy=False)


def _write(array: zarr.Array, v: Variable, spans: list[tuple[int, int]], sink: dict) -> None:
    for j, (a, b) in enumerate(spans):
        if v.layered:
            block = np.full((v.shape[0], b - a, *v.shape[2:]), v.fill, v.dtype)
            for hook, i in v.hooks.items():
                block[i] = _as_numpy(sink[hook][j], v.dtype)
            array[:, a:b] = block
        else:
            (hook,) = v.hooks
            array[a:b] = _as_numpy(sink[hook][j], v.dtype)


def _run(model: CausalLM, ids: np.ndarray, out: Path, root: zarr.Group | None, plan: Plan, start: int,
         progress: bool, t0: float) -> None:
    """The chunked forward: replay up to `start`, then record and commit chunk by chunk (no root: a rank that
    only computes)."""
    n, size = len(ids), plan.chunk_tokens
    names = ("token", "input_ids", *(v.name for v in plan.variables))
    arrays = {name: root[name] for name in names} if root is not None else {}
    crash = _crash_point()
    state = State()
    head = any(not v.hook.startswith("layers.") for v in plan.variables)  # final.* or logits asked for
    with torch.no_grad(), \
            tqdm(total=start, unit="tok", unit_scale=True, desc="replay", disable=not progress or not start) as rbar, \
            tqdm(total=n, initial=start, unit="tok", unit_scale=True, desc="trace", disable=not progress) as bar:
        for i, s in enumerate(range(0, n, size)):
            e = min(s + size, n)
            sink = {} if s >= start else None
            with model.hooks(_hooks(plan, s, e, sink)):
                model(torch.from_numpy(ids[s:e])[None], cache=state, head=head)
            if sink is None:
                rbar.update(e - s)
                continue
            _crash_here(crash, i, "forward")
            # under expert parallelism only rank 0 writes, and a failed write stops every rank
            with distributed.agreed(model.parallel is not None), _io_errors(out, f"writing tokens {s:,}..{e:,}"):
                if root is not None:
                    for j, v in enumerate(plan.variables):
                        _write(arrays[v.name], v, v.spans(s, e), sink)
                        if j == 0:
                            _crash_here(crash, i, "write")
                    arrays["input_ids"][s:e] = ids[s:e].astype(np.int32)
                    arrays["token"][s:e] = np.arange(s, e)
                    _crash_here(crash, i, "marker")
                    marker: dict[str, Any] = {"committed_tokens": e}
                    if e == n:
                        marker.update(complete=True, completed=_now(), summary=_summary(out, plan, n, start, t0))
                    root.attrs.update(marker)
            _crash_here(crash, i, "committed")
            bar.update(e - s)


def _peak_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _summary(out: Path, plan: Plan, n: int, start: int, t0: float) -> dict[str, Any]:
    """What this run did and cost: tokens, layers, bytes on disk (per routing entry), time, peak memory."""
    wall = time.perf_counter() - t0
    routing = sum(disk_bytes(out / v) for v in ("topk_ids", "topk_weights") if (out / v).exists())
    entries = n * len(plan.routed) * plan.k
    return {
        "tokens": n, "traced_tokens": n - start, "resumed_at": start,
        "layers": len(plan.layers), "routed_layers": len(plan.routed), "k": plan.k,
        "bytes_on_disk": disk_bytes(out), "routing_bytes": routing,
        "bytes_per_routing_entry": routing / entries if entries else None,
        "wall_s": round(wall, 3), "tokens_per_s": round((n - start) / wall, 1),
        "peak_rss_bytes": _peak_rss(),
    }
