"""What a published analysis rests on, recorded while its notebook runs under `workbench publish` / `verify`:
models, input files, seeds, routing traces and the environment. A leaf module: the layers that load, trace and
analyse call into it, and it never imports them back.

How. While the notebook runs, $WORKBENCH_PUBLISH_LOG names a JSON-lines file; `record(kind, **fields)` appends
one line to it, and does nothing at all when the variable is unset. Workbench calls it at these points:
- `workbench.load`, after a successful load (`record_model`): source, revision, resolved hub commit, the sha256
  of every weight file, config file and tokenizer file of the checkpoint folder (the loader's per-file digests,
  reused where it already hashed a file), the parsed config's hash (as stores record it), dtype, device and
  backend;
- `workbench.trace` / `model.trace`, at the end of a successful run (`record_dataset(ds, seed, path)` with the
  opened store): the store's path, its seed and its `routing_hash`; `analysis.from_cache` (`record_dataset(ds)`):
  a sequence number and the Dataset's `routing_hash`;
- `record_input(path)`: an input file the notebook reads (its sha256);
- `record_seed(name, value)`: a seed the notebook uses.
The first record of each process is preceded by its `environment()` (package versions, hardware).

`routing_hash(ds)` is the sha256 of a routing Dataset's `layer` coordinate and of the raw little-endian bytes of
`input_ids`, `topk_ids` and `topk_weights` in token order (token-major: each token's layers and ranks together),
so a store and a `from_cache` Dataset of the same routing hash alike whatever their chunking. Each trace also
keeps `ids_sha256`, the same over `input_ids` and `topk_ids` alone, so that a difference confined to the routing
weights is told apart from a change of the selected experts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .checkpoint import TOKENIZER_FILES, sha256
from .schema import ROUTING_VARIABLES
from .version import __version__

LOG_ENV = "WORKBENCH_PUBLISH_LOG"
PACKAGES = ("torch", "numpy", "xarray", "zarr", "dask", "numba", "plotly", "safetensors", "tokenizers",
            "huggingface_hub", "ipywidgets", "nbclient", "nbconvert", "papermill", "ipykernel")
CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
TOKENIZER_RECORDS = (*TOKENIZER_FILES, "special_tokens_map.json")
HASH_BLOCK_TOKENS = 1 << 16  # tokens read at a time while hashing a routing trace

_env_written: int | None = None  # pid that wrote its environment line
_from_cache_count = 0
_log_lock = threading.Lock()


def active() -> bool:
    """Whether this process runs under `publish` or `verify` (records are being collected)."""
    return bool(os.environ.get(LOG_ENV))


def record(kind: str, **fields: Any) -> None:
    """Append one record to $WORKBENCH_PUBLISH_LOG; nothing when it is unset. The first record of a process
    is preceded by its environment (package versions, hardware)."""
    global _env_written
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    with _log_lock:
        lines = []
        if _env_written != os.getpid():
            lines.append(json.dumps({"kind": "environment", "pid": os.getpid(), **environment()}, default=str))
            _env_written = os.getpid()
        lines.append(json.dumps({"kind": kind, "pid": os.getpid(), **fields}, default=str))
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))


def record_input(path: str | os.PathLike) -> Path:
    """Declare `path` an input of the analysis (its sha256 goes into the manifest when publishing); returns it
    as a Path, so `open(record_input("corpus.txt"))` reads and records in one go."""
    p = Path(path)
    if active():
        record("input", path=str(p.resolve()), sha256=sha256(p))
    return p


def record_seed(name: str, value: Any) -> Any:
    """Declare a seed the analysis uses (recorded when publishing, compared by `verify`); returns `value`."""
    if active():
        record("seed", name=str(name), value=value)
    return value


def record_model(model: Any, weight_files: Iterable[Path]) -> None:
    """Record a loaded model (called by `workbench.load`): hashes of its weight, config and tokenizer files."""
    if not active():
        return
    folder = Path(model.checkpoint_dir)
    weights = {relative(f, folder): sha256(Path(f)) for f in sorted(weight_files)}
    config = {n: sha256(folder / n) for n in CONFIG_FILES if (folder / n).is_file()}
    tokenizer = {n: sha256(folder / n) for n in TOKENIZER_RECORDS if (folder / n).is_file()}
    embed = getattr(model, "embed", None)
    weight = getattr(embed, "weight", None)
    record("model", source=str(model.source), revision=model.revision, commit=model.commit,
           folder=str(folder.resolve()), weights=weights, config=config, tokenizer=tokenizer,
           config_sha256=model.config.sha256(),
           dtype=None if weight is None else str(weight.dtype).removeprefix("torch."),
           device=None if weight is None else str(weight.device), backend=getattr(model, "backend", None))


def record_dataset(ds: Any, seed: Any = None, path: str | os.PathLike | None = None) -> None:
    """Record a routing trace: the finished store at `path`, opened as `ds` (by `workbench.trace`, with its
    seed), or, without `path`, a Dataset built in memory (by `analysis.from_cache`), numbered in build order."""
    global _from_cache_count
    if not active():
        return
    if path is not None:
        where: dict[str, Any] = {"origin": "store", "path": str(Path(path).resolve())}
    else:
        _from_cache_count += 1
        where = {"origin": "from_cache", "seq": _from_cache_count}
    record("trace", **where, seed=seed, tokens=int(ds.sizes.get("token", 0)), **_trace_hashes(ds))


def routing_hash(ds: Any) -> str:
    """sha256 of a routing Dataset (store or `from_cache`): its `layer` coordinate and the raw little-endian
    bytes of `input_ids`, `topk_ids` and `topk_weights`, token-major, read in blocks of tokens."""
    return _combine(ds, _variable_digests(ds, ROUTING_VARIABLES), ROUTING_VARIABLES)


def _trace_hashes(ds: Any) -> dict[str, str]:
    digests = _variable_digests(ds, ROUTING_VARIABLES)
    return {"routing_sha256": _combine(ds, digests, ROUTING_VARIABLES),
            "ids_sha256": _combine(ds, digests, ("input_ids", "topk_ids"))}


def _variable_digests(ds: Any, names: Iterable[str]) -> dict[str, str]:
    """{variable: 'dtype shape sha256'} of the token-major bytes of each present variable."""
    import numpy as np

    out = {}
    n = int(ds.sizes.get("token", 0))
    for name in names:
        if name not in ds.variables:
            out[name] = "absent"
            continue
        var = ds[name]
        var = var.transpose("token", ...) if "token" in var.dims else var
        dtype = var.dtype.newbyteorder("<")
        h = hashlib.sha256()
        if "token" in var.dims:
            for a in range(0, n, HASH_BLOCK_TOKENS):
                block = np.asarray(var.isel(token=slice(a, a + HASH_BLOCK_TOKENS)).values)
                h.update(np.ascontiguousarray(block, dtype=dtype).tobytes())
        else:
            h.update(np.ascontiguousarray(np.asarray(var.values), dtype=dtype).tobytes())
        out[name] = f"{dtype.str} {list(var.shape)} {h.hexdigest()}"
    return out


def _combine(ds: Any, digests: Mapping[str, str], names: Iterable[str]) -> str:
    h = hashlib.sha256(b"workbench routing trace 1\n")
    layers = [int(x) for x in ds["layer"].values] if "layer" in ds.coords else []
    h.update(f"layer {layers}\n".encode())
    for name in names:
        h.update(f"{name} {digests[name]}\n".encode())
    return h.hexdigest()


def relative(path: str | os.PathLike, folder: Path) -> str:
    """`path` relative to `folder` (posix, "." for the folder itself) where it lies inside it, else as given."""
    p = Path(path)
    try:
        return p.relative_to(folder).as_posix() or "."
    except ValueError:
        return str(p)


def environment() -> dict[str, Any]:
    """Package versions and hardware of this process."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        import torch

        threads = torch.get_num_threads()
        cuda = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                if torch.cuda.is_available() else None)
    except ImportError:
        threads, cuda = None, None
    hardware = {"platform": platform.platform(), "machine": platform.machine(),
                "processor": platform.processor() or None, "cpu_count": os.cpu_count(), "torch_threads": threads,
                "cuda_devices": cuda}
    return {"versions": versions, "hardware": hardware}


def workbench_source() -> dict[str, Any]:
    """Workbench's version, and the commit (and whether the tree differs from it) of its git checkout, if any."""
    root = Path(__file__).resolve().parent.parent
    commit, dirty = None, None
    if (root / ".git").exists() and shutil.which("git"):
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=30, check=True).stdout.strip() or None
            status = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain",
                                     "--untracked-files=no"], capture_output=True, text=True, timeout=60, check=True)
            dirty = bool(status.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            commit, dirty = None, None
    return {"version": __version__, "commit": commit, "dirty": dirty}
