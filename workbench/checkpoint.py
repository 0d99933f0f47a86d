"""Finding and checking a checkpoint's files: local folder or hub snapshot, safetensors headers, shard index,
recorded sha256 hashes, and the hash cache that spares re-reading an unchanged file.

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
import stat
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CheckpointError, shorten

try:
    import fcntl
except ImportError:  # Windows: writers of the hash cache are not serialised (a lost entry is only hashed again)
    fcntl = None

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
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer checkpoints keep the chat template here; it takes precedence
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE)
LOADER_FILES = ("config.json", INDEX_FILE, *TOKENIZER_FILES)  # what `load` reads besides the weights (hashes cover it)
TRUSTED_REPOS_ENV = "WORKBENCH_TRUSTED_REPOS"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header
MAX_JSON_BYTES = 100 * 2**20  # shard index and manifest
MAX_NUMEL = 2**63 - 1  # torch's limit, also on the nominal size of an empty tensor
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
HASH_BLOCK = 1 << 22  # bytes read and hashed at a time
HASH_THREADS = 8  # files hashed at once: hashing is CPU-bound on fast disks, read-bound on network ones
CACHE_DIR_ENV = "WORKBENCH_CACHE_DIR"
CACHE_FILE = "sha256.json"
CACHE_FORMAT = "workbench sha256 cache 1"
CACHE_ENTRIES = 2048  # files remembered per cache file, the most recently hashed
MAX_CACHED_PATH = 1024  # real paths longer in JSON are not remembered, which bounds a cache file...
MAX_CACHE_BYTES = 4 * 2**20  # ...well under this; a larger one is ignored
SETTLED_NS = 2 * 10**9  # a file changed this shortly before it was hashed is not remembered across processes
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
    check_trusted(text, trusted_repos)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        where = f"{text}@{revision}" if revision else text
        raise CheckpointError(f"could not fetch from the hub: {e}", file=where) from None
    return folder, folder.name


def check_trusted(repo: str, trusted_repos: Iterable[str] | None) -> None:
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

# Digests are remembered by file identity (`_identity`): for this process in `_digests`, and across processes in
# small JSON files (`hash_caches`). What is remembered is the digest computed from the file, whether or not a
# record matched it: a file that failed verification still fails, from the cache. Safety: an entry counts only
# if the real path and all of device, inode, size, mtime and ctime match (any change -> hashed again); a digest
# is remembered across processes only if the file did not change while it was read and had not changed for
# SETTLED_NS before (so a write within one filesystem timestamp tick cannot go unseen); cache files are written
# atomically with mode 0600, and one that is malformed, oversized, or not owned by and private to this user is
# ignored (then replaced). Under the hub cache, another user's private `.workbench/` sends writes to one's own.
_digests: dict[tuple, str] = {}  # (real path, device, inode, size, mtime, ctime) -> sha256
_cache_lock = threading.Lock()  # one writer of the cache files at a time in this process

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


def sha256(path: Path, stop: threading.Event | None = None,
           advance: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file's content, remembered while its identity (real path, device, inode, size, mtime,
    ctime) stays the same: for this process, and for later ones in the hash cache (`hash_caches`). An empty
    string, remembered nowhere, if `stop` is set first; `advance(n)` is told of every n bytes hashed."""
    real, ident = _identity(path)
    digest = _remembered(path, real, ident)
    if digest:
        return digest
    start = time.time_ns()
    h, block = hashlib.sha256(), bytearray(HASH_BLOCK)
    view = memoryview(block)
    with open(real, "rb") as f:
        while n := f.readinto(block):
            if stop is not None and stop.is_set():
                return ""
            h.update(view[:n])
            if advance is not None:
                advance(n)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):
        if _identity(path) == (real, ident):  # not changed (nor removed) while it was read
            _digests[(real, *ident)] = digest
            if max(ident[3], ident[4]) <= start - SETTLED_NS:
                _persist(path, real, [*ident, digest])
    return digest


def sha256_many(paths: Iterable[Path], progress: bool = False) -> dict[Path, str]:
    """{path: hex sha256} of many files, hashed by a pool of threads (hashlib releases the GIL while it hashes a
    block, so large files hash in parallel) and remembered as by `sha256`; with `progress`, a bar in bytes
    whenever over 1 GiB is left to hash."""
    from tqdm.auto import tqdm

    paths = list(paths)
    todo = [p for p in paths if not _remembered(p, *_identity(p))]
    total = sum(p.stat().st_size for p in todo)
    lock = threading.Lock()
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing", disable=not progress or total < 2**30) as bar:
        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(todo)))) as pool:
            return dict(zip(paths, pool.map(lambda p: sha256(p, advance=advance), paths)))


def _identity(path: Path) -> tuple[str, tuple[int, int, int, int, int]]:
    """A file's real path and (device, inode, size, mtime_ns, ctime_ns): what changes when its content may have;
    ctime is set by the kernel on every change and no user can set it back."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _remembered(path: Path, real: str, ident: tuple[int, ...]) -> str | None:
    """The digest remembered for this identity, by this process or in a hash cache; None if none is."""
    key = (real, *ident)
    if key not in _digests:
        for cache in hash_caches(path):
            entry = _read_cache(cache).get(real)
            if entry is not None and tuple(entry[:5]) == ident:
                _digests[key] = entry[5]
                break
    return _digests.get(key)


def hash_caches(path: Path) -> list[Path]:
    """The files that remember the digest of `path` across processes, first choice first: in $WORKBENCH_CACHE_DIR
    if set; else, for a file of the hub cache, its repo folder's `.workbench/` (removed with the repo), then the
    user cache folder ($XDG_CACHE_HOME or ~/.cache, then `moe-workbench/`), which is used when the first is
    read-only."""
    if env := os.environ.get(CACHE_DIR_ENV):
        return [Path(env) / CACHE_FILE]
    from huggingface_hub.constants import HF_HUB_CACHE

    caches = []
    hub, parts = Path(os.path.abspath(os.path.expanduser(HF_HUB_CACHE))), Path(os.path.abspath(path)).parts
    n = len(hub.parts)
    if parts[:n] == hub.parts and len(parts) > n + 1 and "--" in parts[n]:  # models--org--name/snapshots/...
        caches.append(hub / parts[n] / ".workbench" / CACHE_FILE)
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder
        base = os.environ.get("XDG_CACHE_HOME", "")
        caches.append((Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "moe-workbench" / CACHE_FILE)
    return caches


def _read_cache(cache: Path) -> dict[str, list]:
    """The well-formed entries of a hash cache file, {real path: [device, inode, size, mtime_ns, ctime_ns,
    sha256]}; nothing from a file that is missing, unreadable, oversized, malformed, or that another user owns
    or could have written (where the OS has owners)."""
    try:
        fd = os.open(cache, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO put there must not block
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CACHE_BYTES
                    or hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022)):
                return {}
            data = json.loads(f.read(MAX_CACHE_BYTES))
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {path: entry for path, entry in files.items()
            if isinstance(entry, list) and len(entry) == 6 and all(_is_int(x) for x in entry[:5])
            and isinstance(entry[5], str) and _SHA256.fullmatch(entry[5])}


def _persist(path: Path, real: str, entry: list) -> None:
    """Remember one digest in the first hash cache that can be written; a cache that cannot is skipped."""
    if len(json.dumps(real)) > MAX_CACHED_PATH:
        return
    for cache in hash_caches(path):
        try:
            cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with _cache_lock, open(cache.with_name(cache.name + ".lock"), "a") as lock:
                if fcntl is not None:  # one writer at a time across processes, e.g. the ranks of one node
                    fcntl.flock(lock, fcntl.LOCK_EX)
                files = _read_cache(cache)
                files.pop(real, None)
                files[real] = entry
                kept = dict(list(files.items())[-CACHE_ENTRIES:])  # the most recently hashed
                _write_atomic(cache, json.dumps({"format": CACHE_FORMAT, "files": kept}), 0o600)
            return
        except OSError:
            continue


def _write_atomic(path: Path, text: str, mode: int) -> None:
    """Replace `path` by `text` at once (a temp file beside it, then os.replace): readers see the old file or the
    new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_manifest(folder: Path, overwrite: bool = False, progress: bool = False) -> dict[str, str]:
    """Write `folder/SHA256SUMS` (`sha256sum` format, sorted) over every *.safetensors file and the config, shard
    index and tokenizer that `load` reads, atomically; returns {file: sha256}. A SHA256SUMS recording other files
    or hashes is kept (CheckpointError) unless `overwrite`; one recording the same is left as it is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError("not a checkpoint folder", file=str(folder))
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise CheckpointError("no *.safetensors weights in the folder", file=str(folder))
    files = weights + [folder / n for n in LOADER_FILES if (folder / n).is_file()]
    odd = [f.name for f in files if f.name.splitlines() != [f.name] or "\\" in f.name or f.name != f.name.rstrip()]
    if odd:
        raise CheckpointError(f"file name {_clip(odd[0])} cannot be written plainly in {MANIFEST}", file=str(folder))
    digests = {p.name: d for p, d in sorted(sha256_many(files, progress).items(), key=lambda x: x[0].name)}
    target = folder / MANIFEST
    if target.exists():
        try:
            old = _read_manifest(target)
        except CheckpointError:
            old = None
        if old == digests:
            return digests
        if not overwrite:
            raise CheckpointError(f"a different {MANIFEST} is already there; pass overwrite=True (--overwrite) "
                                  "to replace it", file=str(target))
    _write_atomic(target, "".join(f"{d}  {name}\n" for name, d in digests.items()), 0o644)
    return digests

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
