"""Finding and checking a checkpoint's files: local folder or hub snapshot, safetensors headers, shard index.

Nothing here reads tensor data: headers are validated in full first, so a bad file is refused with
an error naming it before any weight is copied.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import CheckpointError

# Files fetched from the hub: config, weights, tokenizer. Never code, never pickles.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what its header says."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def resolve(source: str | Path, revision: str | None = None) -> tuple[Path, str | None]:
    """A local checkpoint folder for `source` and, for hub repos, the resolved commit.

    A hub repo id goes through `huggingface_hub.snapshot_download` (honouring HF_HUB_OFFLINE and the
    cache), fetching only config, safetensors and tokenizer files.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub repo ids, not the local folder {path}")
        return path, None
    text = str(source)
    if path.exists() or text.startswith(("/", ".", "~")) or not _REPO_ID.match(text):
        raise CheckpointError("no such checkpoint folder (and not a hub repo id)", file=text)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        where = f"{text}@{revision}" if revision else text
        raise CheckpointError(f"could not fetch from the hub: {e}", file=where) from None
    return folder, folder.name


def warn_about_code(folder: Path, config: dict) -> None:
    """Checkpoints may ship code; it is never run. Say so, once."""
    shipped = sorted(p.name for p in folder.glob("*.py"))
    if config.get("auto_map") or shipped:
        warnings.warn(
            f"{folder}: ignoring checkpoint code ({', '.join(shipped) or 'auto_map'}); "
            "workbench only runs its own model implementations",
            stacklevel=3,
        )


def weight_files(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint with its file, from the shard index or the safetensors files."""
    index = folder / INDEX_FILE
    if index.exists():
        return _from_index(folder, index)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"only pickle weights found ({', '.join(pickles)}); workbench never unpickles. Convert them "
                "where you trust the source, e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), "
                "'model.safetensors'), or use the repo's safetensors revision",
                file=str(folder),
            )
        raise CheckpointError("no *.safetensors weights in the folder", file=str(folder))
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor also stored in {tensors[name].file.name}", file=str(f), tensor=name)
            tensors[name] = info
    return tensors


def _from_index(folder: Path, index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError("not a valid shard index (needs a 'weight_map' object)", file=str(index)) from None
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors = {}
    for name, shard in weight_map.items():
        parts = PurePosixPath(str(shard)).parts
        if not isinstance(shard, str) or len(parts) != 1 or shard in (".", "..") or "\\" in shard:
            raise CheckpointError(f"shard {shard!r} is not a file inside the checkpoint folder",
                                  file=str(index), tensor=name)
        if shard not in headers:
            path = folder / shard
            if not path.is_file():
                raise CheckpointError(f"index names missing shard {shard!r}", file=str(index), tensor=name)
            headers[shard] = read_header(path)
        if name not in headers[shard]:
            raise CheckpointError(f"index places this tensor in {shard}, which lacks it", file=str(index), tensor=name)
        tensors[name] = headers[shard][name]
    return tensors


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and fully validate a safetensors header (sizes, dtypes, offsets in range and disjoint)."""
    file = str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError("truncated: shorter than the 8-byte header length", file=file)
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES} cap",
                                  file=file)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError("header is not valid JSON", file=file) from None
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", file=file)
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    out, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError("header entry needs exactly dtype, shape, data_offsets", file=file, tensor=name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"unknown dtype {dtype!r}", file=file, tensor=name)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointError(f"bad shape {shape!r}", file=file, tensor=name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"data offsets {offsets!r} outside the {data_size}-byte data section",
                                  file=file, tensor=name)
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise CheckpointError(f"{offsets[1] - offsets[0]} bytes do not hold shape {shape} of {dtype}",
                                  file=file, tensor=name)
        spans.append((offsets[0], offsets[1], name))
        out[name] = TensorInfo(path, dtype, tuple(shape))
    spans.sort()
    for (_, end, a), (start, stop, b) in zip(spans, spans[1:]):
        if start < end and stop > start:
            raise CheckpointError(f"data overlaps tensor {a!r}", file=file, tensor=b)
    return out
