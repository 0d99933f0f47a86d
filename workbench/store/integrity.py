"""Damage in a store (docs/architecture.md, "Store schema"): every chunk ends in a crc32c checksum of its
compressed bytes (`CODECS`), so a changed byte is detected rather than decoded into wrong values. A chunk that
cannot be read (checksum mismatch, undecodable, unreadable file) raises a StoreError naming the store, variable,
chunk and tokens: in `reading` blocks, in `open_store`'s dask tasks (`getter`); `damaged` scans whole stores.

Each array's codecs are in its zarr metadata, so stores written before checksums read as before; in them only a
chunk that no longer decodes is found.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec, Crc32cCodec

from ..errors import StoreError, shorten

# the bytes-to-bytes codecs of every array a trace writes: compressor, then the checksum of what it wrote
CODECS = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())
CHECK_BYTES = 64 << 20  # uncompressed bytes decoded at once by `damaged`
REMEDY = "Restore the store from a copy, or trace it again with overwrite=True (CLI: --overwrite)"


@dataclass(frozen=True)
class Damage:
    """A chunk of a store that cannot be read: its variable, chunk index and file, the tokens it holds, why."""

    variable: str
    chunk: tuple[int, ...]
    key: str  # the chunk's file below the variable's folder, e.g. c/0/1/0
    tokens: tuple[int, int] | None  # its tokens [start, stop); None: a variable without a token axis
    reason: str

    def __str__(self) -> str:
        where = f", tokens {self.tokens[0]:,}..{self.tokens[1]:,}" if self.tokens else ""
        return f"{self.variable} chunk {self.chunk} ({self.variable}/{self.key}){where}: {self.reason}"


def store_path(z: zarr.Array) -> str:
    """The store of `z` as its path (a URL for a remote store)."""
    root = getattr(z.store, "root", None)
    return str(root if root is not None else z.store)


def _token_axis(z: zarr.Array) -> int | None:
    names = tuple(z.metadata.dimension_names or ())
    return names.index("token") if "token" in names else None


def _chunks_along(sel: Any, size: int, chunk: int) -> list[int]:
    """Chunk indices along one axis that a selection (slice, integer or integer array) touches."""
    if isinstance(sel, slice):
        start, stop, step = sel.indices(size)
        idx = np.arange(start, stop, step)
    else:
        idx = np.asarray(sel, dtype=np.int64).reshape(-1) % max(size, 1)
    return np.unique(idx // chunk).tolist()


def _damage(z: zarr.Array, index: tuple[int, ...], error: Exception, stop: int | None = None) -> Damage:
    axis = _token_axis(z)
    tokens = None
    if axis is not None:
        c, n = z.chunks[axis], z.shape[axis] if stop is None else stop
        tokens = (index[axis] * c, min((index[axis] + 1) * c, n))
    return Damage(z.path, index, z.metadata.chunk_key_encoding.encode_chunk_key(index), tokens,
                  f"{type(error).__name__}: {shorten(' '.join(str(error).split()), 200).rstrip('.')}")


def damage_in(z: zarr.Array, selection: tuple = (), stop: int | None = None) -> Iterator[Damage]:
    """Each chunk of `z` that `selection` touches and that cannot be read on its own (tokens up to `stop`)."""
    sel = [s for s in selection if s is not None]
    sel += [slice(None)] * (z.ndim - len(sel))
    for index in itertools.product(*(_chunks_along(s, n, c) for s, n, c in zip(sel, z.shape, z.chunks))):
        try:
            z.get_block_selection(index)
        except Exception as e:  # whatever stops one chunk from reading is damage there
            yield _damage(z, index, e, stop)


def read_error(z: zarr.Array, selection: tuple, error: Exception) -> StoreError | None:
    """The StoreError for `error` raised reading `selection` of `z`, naming the first chunk there that cannot be
    read on its own; None where each reads (the error came from elsewhere)."""
    damage = next(damage_in(z, selection), None)
    if damage is None:
        return None
    return StoreError(f"{store_path(z)}: cannot read {damage}. The store is damaged there; `workbench info --check "
                      f"{store_path(z)}` lists every damaged token range. {REMEDY}")


@contextlib.contextmanager
def reading(z: zarr.Array, selection: tuple = ()) -> Iterator[None]:
    """Raise an error of the block that a damaged chunk of `z` in `selection` caused as a StoreError naming it."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        error = read_error(z, selection, e)
        if error is None:
            raise
        raise error from e


def _zarr_array(a: Any) -> zarr.Array | None:
    """The zarr array under xarray's lazy wrappers (each holds the next as `array`, the last hands out its own)."""
    while a is not None and not isinstance(a, zarr.Array):
        a = a.get_array() if hasattr(a, "get_array") else getattr(a, "array", None)
    return a


def getter(a: Any, b: tuple, asarray: bool = True, lock: Any = None) -> Any:
    """dask's getter for the tasks of `open_store`'s arrays (source array, slices): a chunk that cannot be read
    raises a StoreError naming it."""
    from dask.array.core import getter as read

    try:
        return read(a, b, asarray=asarray, lock=lock)
    except Exception as e:
        z = _zarr_array(a)
        error = None if z is None else read_error(z, b, e)
        if error is None:
            raise
        raise error from e


def damaged_metadata(out: Path) -> str | None:
    """Why the store at `out` cannot be opened where a zarr.json of it (the root's or an array's) is not a JSON
    object (truncated, overwritten); None where each is."""
    for meta in [out / "zarr.json", *sorted(out.glob("*/zarr.json"))]:
        if meta.parent.name.endswith(".partial") or not meta.is_file():
            continue
        try:
            ok = isinstance(json.loads(meta.read_bytes()), dict)
            reason = "not a JSON object"
        except ValueError as e:  # invalid JSON or UTF-8
            ok, reason = False, f"not valid JSON: {shorten(str(e), 200)}"
        if not ok:
            return f"{out} is a damaged store: {meta} is {reason}, so the store cannot be read. {REMEDY}"
    return None


def damaged(group: zarr.Group, stop: int, progress: bool = False) -> list[Damage]:
    """Every chunk of `group`'s arrays holding tokens before `stop` (or no token axis) that cannot be read: read a
    block of chunks at a time, chunk by chunk only where a block fails; with `progress`, a bar past 1 GiB."""
    spans = []
    for name in sorted(group.array_keys()):
        z = group[name]
        axis = _token_axis(z)
        if axis is None:
            spans.append((z, (slice(None),) * z.ndim, z.nbytes))
            continue
        n = min(stop, z.shape[axis])
        per_token = z.nbytes // max(z.shape[axis], 1)
        c = z.chunks[axis]
        step = max(1, CHECK_BYTES // max(per_token * c, 1)) * c
        for s in range(0, n, step):
            sel = tuple(slice(s, min(s + step, n)) if i == axis else slice(None) for i in range(z.ndim))
            spans.append((z, sel, per_token * (min(s + step, n) - s)))
    total = sum(size for *_, size in spans)
    found: list[Damage] = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="check", disable=not progress or total < 2**30) as bar:
        for z, sel, size in spans:
            try:
                z[sel]
            except Exception:  # find the chunks that fail on their own
                bad = list(damage_in(z, sel, stop))
                if not bad:
                    raise
                found += bad
            bar.update(size)
    return found
