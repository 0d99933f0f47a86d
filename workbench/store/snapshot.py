"""Resume snapshots: the bounded attention state of a trace (DeepSeek-V4's sliding windows, its compressors'
pending tokens and pooled entries) saved with each commit, so a resumed trace starts at the last commit instead of
replaying the committed tokens.

On disk: `resume/` in the store, a zarr group with no arrays, holds one safetensors file per commit named by the
committed token count (`000000008192.safetensors`). A file holds every state tensor whole but the append-only ones
(`CausalLM.appended_state`), of which it holds only the rows appended since the previous file; its header records
each such tensor's rows before it and a sha256 of every tensor. The file is written under a temporary name and
renamed before the commit marker, so the marker commits chunk and snapshot together; files past the marker are a
killed commit's and are removed. The last chunk removes `resume/` before the final marker: a complete store holds
none. Families whose state grows with every token (full attention) take no snapshot and resume by replaying.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import zarr
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..models.base import State
from .disk import crash_here

FOLDER = "resume"
REPLAY_ENV = "WORKBENCH_TRACE_REPLAY"  # set (non-empty): resume by replaying even where a snapshot exists (benchmarks)
ABOUT = ("attention state at each commit, one safetensors file per commit named by its committed tokens; "
         "removed when the trace completes")


class Snapshots:
    """The state snapshots of the store at `out`, for a model whose state tensors named `appended` only grow
    along dim 1. `rows` tracks how many rows of each appended tensor the files already hold."""

    def __init__(self, out: Path, appended: tuple[str, ...]):
        self.folder, self.appended = out / FOLDER, appended
        self.rows: dict[str, int] = {}

    def _files(self) -> list[tuple[int, Path]]:
        """(committed tokens, file) of every snapshot, in token order."""
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.glob("*.safetensors"):
            if p.stem.isdigit():
                found.append((int(p.stem), p))
        return sorted(found)

    def restore(self, committed: int, device: torch.device) -> State | None:
        """The State after `committed` tokens, on `device`; None (with a warning, the snapshots cleared) where it
        cannot be read whole, so the caller replays."""
        files = self._files()
        for tokens, p in files:
            if tokens > committed:  # a commit killed before its marker
                p.unlink()
        files = [(tokens, p) for tokens, p in files if tokens <= committed]
        if not files or files[-1][0] != committed:
            return self._fallback(committed, f"no snapshot at token {committed:,}")
        try:
            layers = self._read(files)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            return self._fallback(committed, str(e))
        state = State(offset=committed)
        for key, t in layers.items():
            *path, leaf = key.split(".")
            d = state.layers
            for part in path:
                d = d.setdefault(part, {})
            d[leaf] = t.to(device)
        return state

    def _read(self, files: list[tuple[int, Path]]) -> dict[str, torch.Tensor]:
        """Flat state tensors from the snapshot files: the last file's whole tensors, every file's appended rows
        concatenated. Raises ValueError on any mismatch (checksum, rows, committed tokens)."""
        parts: dict[str, list[torch.Tensor]] = {}
        whole: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        for tokens, p in files:
            with safe_open(p, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("committed_tokens") != str(tokens):
                    raise ValueError(f"{p.name} says it holds the state at token {meta.get('committed_tokens')}")
                before, digests = json.loads(meta["rows_before"]), json.loads(meta["sha256"])
                if set(digests) != set(f.keys()):
                    raise ValueError(f"{p.name} lists tensors {sorted(digests)} but holds {sorted(f.keys())}")
                for key in f.keys():
                    t = f.get_tensor(key)
                    if _digest(t) != digests[key]:
                        raise ValueError(f"{p.name}: tensor {key} fails its checksum")
                    if key in before:
                        if before[key] != rows.get(key, 0):
                            raise ValueError(f"{p.name}: {key} continues at row {before[key]}, the earlier files "
                                             f"hold {rows.get(key, 0)}")
                        parts.setdefault(key, []).append(t)
                        rows[key] = before[key] + t.shape[1]
                    elif tokens == files[-1][0]:
                        whole[key] = t
            if tokens == files[-1][0] and set(before) != set(parts):
                raise ValueError(f"{p.name} continues {sorted(before)}, the earlier files hold {sorted(parts)}")
        self.rows = rows
        return {**whole, **{key: torch.cat(ts, 1) for key, ts in parts.items()}}

    def _fallback(self, committed: int, why: str) -> None:
        warnings.warn(f"{self.folder}: the state snapshot at token {committed:,} cannot be used ({why}); resuming "
                      "by replaying the committed tokens", stacklevel=5)
        self.clear()
        return None

    def write(self, state: State, crash: tuple[int, str] | None, chunk: int) -> None:
        """Save `state` (after `state.offset` tokens) as the next snapshot file, atomically: a temporary file
        renamed into place (crash point "snapshot" of trace chunk `chunk` lies between)."""
        tensors, before, grown = {}, {}, {}
        for key, t in _flat(state.layers).items():
            if key.rsplit(".", 1)[-1] in self.appended:
                have = self.rows.get(key, 0)
                if t.shape[1] < have:
                    raise RuntimeError(f"state tensor {key} shrank from {have} to {t.shape[1]} rows; it is "
                                       "declared append-only")
                t, before[key], grown[key] = t[:, have:], have, t.shape[1]
            tensors[key] = t.detach().to("cpu").contiguous()
        meta = {"committed_tokens": str(state.offset), "rows_before": json.dumps(before),
                "sha256": json.dumps({key: _digest(t) for key, t in tensors.items()})}
        if not (self.folder / "zarr.json").is_file():
            zarr.create_group(self.folder, zarr_format=3, attributes={"about": ABOUT}, overwrite=True)
        path = self.folder / f"{state.offset:012d}.safetensors"
        tmp = path.with_name(path.name + ".partial")  # a killed writer's temporaries are removed on resume
        tmp.write_bytes(save(tensors, metadata=meta))
        crash_here(crash, chunk, "snapshot")
        os.replace(tmp, path)
        self.rows.update(grown)

    def clear(self) -> None:
        """Remove every snapshot (the folder too): the next one starts afresh with whole tensors."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.rows = {}


def _flat(d: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested state dict by dotted key (`1.compressor.entries`)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
        else:
            raise TypeError(f"state entry {prefix}{k} is a {type(v).__name__}, not a tensor: it cannot be snapshot")
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
