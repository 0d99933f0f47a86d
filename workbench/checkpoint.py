"""Finding and checking a checkpoint's files: local folder or hub snapshot, safetensors headers, shard index,
recorded sha256 hashes.

Headers are validated in full (size cap, UTF-8 JSON object, dtypes, shapes, offsets covering the data section
exactly once) before any tensor data is read, so a bad file is refused with an error naming it and the tensor.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CheckpointError, shorten

# Files fetched from the hub: config, weights, tokenizer and chat template. Never code, never pickles.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
MANIFEST = "SHA256SUMS"
TRUSTED_REPOS_ENV = "WORKBENCH_TRUSTED_REPOS"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header
MAX_JSON_BYTES = 100 * 2**20  # shard index and manifest
MAX_NUMEL = 2**63 - 1  # torch's limit, also on the nominal size of an empty tensor
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what its header says."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range [start, stop) of its data in the file


def resolve(source: str | Path, revision: str | None = None,
            trusted_repos: Iterable[str] | None = None) -> tuple[Path, str | None]:
    """A local checkpoint folder for `source` and, for hub repos, the resolved commit.

    A hub repo id goes through `huggingface_hub.snapshot_download` (honouring HF_HUB_OFFLINE and the
    cache), fetching only config, safetensors and tokenizer files. With an allow-list (`trusted_repos`, else
    the comma-separated globs of $WORKBENCH_TRUSTED_REPOS) a repo not on it is refused before any download.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub repo ids, not the local folder {path}")
        return path, None
    text = str(source)
    if path.exists() or text.startswith(("/", ".", "~")) or not _REPO_ID.match(text):
        raise CheckpointError("no such checkpoint folder (and not a hub repo id)", file=text)
    _check_trusted(text, trusted_repos)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        where = f"{text}@{revision}" if revision else text
        raise CheckpointError(f"could not fetch from the hub: {e}", file=where) from None
    return folder, folder.name


def _check_trusted(repo: str, trusted_repos: Iterable[str] | None) -> None:
    """Refuse a hub repo outside the allow-list, where one is set (argument first, then the environment)."""
    if trusted_repos is None:
        env = os.environ.get(TRUSTED_REPOS_ENV, "")
        if not env.strip():
            return
        patterns, origin = [p.strip() for p in env.split(",") if p.strip()], f"${TRUSTED_REPOS_ENV}"
    else:
        patterns, origin = [trusted_repos] if isinstance(trusted_repos, str) else list(trusted_repos), "trusted_repos"
    if not any(fnmatch.fnmatchcase(repo, p) for p in patterns):
        raise CheckpointError(f"repo is not on the allow-list {origin} ({', '.join(patterns) or 'empty'}); "
                              "nothing was downloaded", file=repo)


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
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError("not a valid shard index (needs a 'weight_map' object)", file=str(index))
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors = {}
    for name, shard in weight_map.items():
        if (not isinstance(shard, str) or len(PurePosixPath(shard).parts) != 1 or shard in (".", "..")
                or "\\" in shard):
            raise CheckpointError(f"shard {_clip(shard)} is not a file inside the checkpoint folder",
                                  file=str(index), tensor=name)
        if not shard.endswith(".safetensors"):
            raise CheckpointError(f"shard {_clip(shard)} is not a .safetensors file (pickles are never opened)",
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


def _read_json(path: Path) -> dict:
    """A small JSON object file (shard index), refusing oversized, non-UTF-8, deeply nested or non-object text."""
    data = _parse_json(_read_small(path), str(path))
    if not isinstance(data, dict):
        raise CheckpointError("not a JSON object", file=str(path))
    return data


def _read_small(path: Path) -> bytes:
    """The bytes of a small regular file (shard index, manifest)."""
    if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"not a regular file of at most {MAX_JSON_BYTES} bytes", file=str(path))
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot be read ({e.strerror or e})", file=str(path)) from None


def _parse_json(raw: bytes, file: str) -> Any:
    """Strict JSON: UTF-8 only, no key twice in one object (two readers must never disagree on a tensor)."""
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"key {_clip(key)} appears twice in one JSON object", file=file)
            out[key] = value
        return out

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except CheckpointError:
        raise
    except UnicodeDecodeError:
        raise CheckpointError("JSON text is not valid UTF-8", file=file) from None
    except RecursionError:
        raise CheckpointError("JSON nests too deeply", file=file) from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python's digit limit
        raise CheckpointError(f"not valid JSON ({e})", file=file) from None


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and fully validate a safetensors header: a UTF-8 JSON object of at most MAX_HEADER_BYTES, known
    dtypes, shapes whose byte size matches the offsets, offsets that tile the data section exactly (no byte
    outside the file, shared by two tensors or owned by none)."""
    file = str(path)
    if not path.is_file():
        raise CheckpointError("not a regular file", file=file)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            raw = f.read(n) if len(head) == 8 and n <= MAX_HEADER_BYTES and 8 + n <= size else b""
    except OSError as e:
        raise CheckpointError(f"cannot be read ({e.strerror or e})", file=file) from None
    if len(head) < 8:
        raise CheckpointError("truncated: shorter than the 8-byte header length", file=file)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES} cap",
                              file=file)
    if not raw.startswith(b"{"):
        raise CheckpointError("header does not start with '{' (not a safetensors file)", file=file)
    header = _parse_json(raw, file)
    if not isinstance(header, dict):
        raise CheckpointError("header is not a JSON object", file=file)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError("__metadata__ must map strings to strings", file=file)
    data_size = size - 8 - n
    out, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError("header entry needs exactly dtype, shape, data_offsets", file=file, tensor=name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise CheckpointError(f"unknown dtype {_clip(dtype)} (known: {', '.join(DTYPE_SIZES)})", file=file,
                                  tensor=name)
        numel = _numel(shape) if isinstance(shape, list) else None
        if numel is None:
            raise CheckpointError(f"bad shape {_clip(shape)}", file=file, tensor=name)
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"data offsets {_clip(offsets)} outside the {data_size}-byte data section (the "
                                  "file is truncated or its header lies)", file=file, tensor=name)
        if offsets[1] - offsets[0] != numel * DTYPE_SIZES[dtype]:
            raise CheckpointError(f"{offsets[1] - offsets[0]} bytes do not hold shape {_clip(shape)} of {dtype}",
                                  file=file, tensor=name)
        spans.append((offsets[0], offsets[1], name))
        out[name] = TensorInfo(path, dtype, tuple(shape), (8 + n + offsets[0], 8 + n + offsets[1]))
    end, last = 0, None
    for start, stop, name in sorted(spans):
        if start < end:
            raise CheckpointError(f"data overlaps tensor {_clip(last)}", file=file, tensor=name)
        if start > end:
            raise CheckpointError(f"bytes {end}..{start} of the data section belong to no tensor", file=file,
                                  tensor=name)
        end, last = stop, name
    if end != data_size:
        raise CheckpointError(f"bytes {end}..{data_size} of the data section belong to no tensor", file=file)
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _numel(shape: list) -> int | None:
    """Elements of a shape; None unless every dim is a non-negative int and the non-zero dims multiply to at
    most MAX_NUMEL (checked as it goes, so a hostile shape cannot make a huge product)."""
    nominal = 1
    for d in shape:
        if not _is_int(d) or d < 0:
            return None
        if d:
            nominal *= d
            if nominal > MAX_NUMEL:
                return None
    return 0 if 0 in shape else nominal


def _clip(value: Any) -> str:
    """repr of a value read from a checkpoint, cut short."""
    return shorten(repr(value), 200)


# ---------------------------------------------------------------- recorded hashes

_digests: dict[tuple[int, ...], str] = {}  # (device, inode, size, mtime, ctime) -> sha256, for this process


def recorded_sha256(folder: Path, files: Iterable[Path], required: Iterable[Path]) -> dict[Path, list[tuple[str, str]]]:
    """The sha256 on record for each of `files`, with where it was recorded: the folder's SHA256SUMS
    (`sha256sum` format) and, for hub-cache snapshots, the blob a file links to (the hub names each LFS blob
    by its sha256). With a manifest present every file in `required` (the weights) must be listed."""
    manifest = _read_manifest(folder / MANIFEST) if (folder / MANIFEST).exists() else None
    out: dict[Path, list[tuple[str, str]]] = {}
    required = set(required)
    for path in files:
        found = []
        if manifest is not None:
            rel = path.relative_to(folder).as_posix()
            if rel in manifest:
                found.append((manifest[rel], str(folder / MANIFEST)))
            elif path in required:
                raise CheckpointError(f"not listed in {MANIFEST}; the manifest must cover every weight file",
                                      file=str(path))
        if path.is_symlink():
            blob = path.resolve()
            if blob.parent.name == "blobs" and _SHA256.fullmatch(blob.name):
                found.append((blob.name, "the hub's record (its cache blob name)"))
        if found:
            out[path] = found
    return out


def _read_manifest(path: Path) -> dict[str, str]:
    """{file name relative to the folder: sha256} from `<sha256>  <name>` lines (`#` comments allowed)."""
    try:
        lines = _read_small(path).decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise CheckpointError("not valid UTF-8", file=str(path)) from None
    out = {}
    for i, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _MANIFEST_LINE.fullmatch(line.rstrip())
        if not m:
            raise CheckpointError(f"line {i} is not '<sha256>  <file name>'", file=str(path))
        out[PurePosixPath(m[2]).as_posix()] = m[1].lower()
    return out


def sha256(path: Path, stop: threading.Event | None = None) -> str:
    """Hex sha256 of a file's content, remembered for this process while the file's inode, size, mtime and
    ctime (which no user can set) stay the same; an empty string, remembered nowhere, if `stop` is set first."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _digests:
        h, block = hashlib.sha256(), bytearray(1 << 22)
        view = memoryview(block)
        with open(path, "rb") as f:
            while n := f.readinto(block):
                if stop is not None and stop.is_set():
                    return ""
                h.update(view[:n])
        _digests[key] = h.hexdigest()
    return _digests[key]


@contextlib.contextmanager
def verified(expected: dict[Path, list[tuple[str, str]]]) -> Iterator[None]:
    """Hash `expected`'s files in background threads while the block runs (loading overlaps hashing); on leaving
    it, raise CheckpointError for a file whose content does not match a recorded sha256. If the block fails,
    hashing stops at once and a mismatch already found is raised in preference (a corrupt file explains the rest)."""
    if not expected:
        yield
        return
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=min(4, len(expected))) as pool:
        futures = {path: pool.submit(sha256, path, stop) for path in sorted(expected)}
        try:
            yield
        except BaseException:
            stop.set()
            _check_hashes(expected, futures)
            raise
        _check_hashes(expected, futures)


def _check_hashes(expected: dict[Path, list[tuple[str, str]]], futures: dict) -> None:
    """Compare each hashed file with its records; a file whose hashing was stopped is skipped."""
    for path, future in futures.items():
        try:
            actual = future.result()
        except OSError as e:
            raise CheckpointError(f"cannot be read to check its sha256 ({e.strerror or e})", file=str(path)) from None
        for want, where in expected[path]:
            if actual and actual != want:
                raise CheckpointError(f"sha256 mismatch: content hashes to {actual}, but {where} records {want}; "
                                      "the file is corrupt or was altered: fetch it again from a source you trust",
                                      file=str(path))
