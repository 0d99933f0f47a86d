"""The store on disk: opening it, creating it, one writer's lock, format checks, I/O errors and damage checks.

Crash safety: zarr writes every file to a temporary name and renames it into place, so a file is either old
or new, never torn. A trace chunk writes all its arrays first and the marker `committed_tokens` (root
metadata) last; readers trim every variable to the marker, so a chunk whose marker was never written is
invisible, and resume rewrites it. One writer at a time: it holds an exclusive flock on the store directory,
which the OS releases when the writer dies. Covered: process death at any point (SIGKILL); not covered: power
loss (nothing is fsynced; a chunk it tears fails its checksum). Damage (a chunk or zarr.json that cannot be
read) raises a StoreError naming it, as `integrity` describes; resume first checks every committed chunk.

Test hook: `WORKBENCH_TRACE_CRASH=CHUNK:POINT` makes the writer SIGKILL itself at POINT (`forward`, `write`,
`snapshot`: the state snapshot written, not yet renamed; `marker` or `committed`) of trace chunk number CHUNK.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from ..errors import StoreError
from ..schema import DTYPES, GENERATED, INPUT_IDS
from .integrity import CODECS, REMEDY, Damage, damaged, damaged_metadata, getter, reading
from .layout import Layout

if TYPE_CHECKING:
    import xarray

FORMAT = 1
CRASH_ENV = "WORKBENCH_TRACE_CRASH"
# root attrs that must match for a trace to resume a store
IDENTITY = ("workbench_store", "weights_sha256", "config_sha256", "dtype", "tokens_total", "tokens_sha256",
            "names", "layers", "windows", "chunk_tokens", "generation", "saes")


def open_store(path: str | Path) -> xarray.Dataset:
    """The store at `path` as an xarray Dataset backed by dask (one task per stored chunk), trimmed to the
    committed tokens, provenance in `ds.attrs`. A chunk that cannot be read raises a StoreError naming it when
    read (`.values`, `.compute()`)."""
    import xarray as xr

    path = Path(path).expanduser()
    _readable_attrs(path)
    with warnings.catch_warnings(), io_errors(path, "reading the store"), contextlib.ExitStack() as coordinates:
        # temporaries a killed writer left behind, removed when it is resumed
        warnings.filterwarnings("ignore", message=r"Object at .*\.partial is not recognized")
        for name, z in zarr.open_group(path, mode="r").arrays():  # index coordinates are read here, not by dask
            if tuple(z.metadata.dimension_names or ()) == (name,):
                coordinates.enter_context(reading(z))
        ds = xr.open_zarr(path, consolidated=False, chunks={}, from_array_kwargs={"getitem": getter})
    return ds.isel(token=slice(0, ds.attrs["committed_tokens"])) if "token" in ds.dims else ds


def check(path: str | Path, progress: bool = True) -> list[Damage]:
    """Every chunk of the store at `path` that holds committed tokens and cannot be read (checksum mismatch,
    undecodable, unreadable file): `workbench info --check`. Empty: the store reads whole."""
    path = Path(path).expanduser()
    attrs = _readable_attrs(path)
    with io_errors(path, "checking the store"):
        return damaged(zarr.open_group(path, mode="r"), attrs["committed_tokens"], progress)


def _readable_attrs(path: Path) -> dict:
    """Root attrs of the store at `path`, refusing what is not a store this workbench reads."""
    attrs = existing_attrs(path)
    if attrs is None:
        raise StoreError(f"{path}: no store here")
    check_format(path, attrs, "open it with a workbench version that reads it")
    return attrs


def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a store or one of its variables (every file below `path`)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def existing_attrs(out: Path, overwrite: bool = False) -> dict | None:
    """Root attrs of the store at `out`; None where there is nothing to keep. Refuses anything else, and a store
    whose metadata is damaged unless `overwrite` (then {}: nothing worth keeping)."""
    with io_errors(out, "reading the store"):
        if not out.exists():
            return None
        if not out.is_dir():
            raise StoreError(f"{out} exists and is not a directory")
        if all(p.name.endswith(".partial") for p in out.iterdir()):
            return None
        damage = damaged_metadata(out)
        if damage is not None:
            if overwrite:
                return {}
            raise StoreError(damage)
        try:
            attrs = zarr.open_group(out, mode="r").attrs.asdict()
        except (FileNotFoundError, ValueError):
            attrs = {}
    if "workbench_store" not in attrs:
        raise StoreError(f"{out} is not empty and is not a workbench store; refusing to touch it")
    return attrs


def check_format(out: Path, attrs: dict, remedy: str) -> None:
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
def io_errors(out: Path, doing: str) -> Iterator[None]:
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
def write_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on the store directory for the block; another holder is another live writer."""
    with io_errors(out, "creating the store"):
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


def prepare(out: Path, attrs: dict | None, prov: dict, layout: Layout, resume: bool, overwrite: bool,
            progress: bool = False) -> tuple[zarr.Group, int]:
    """Open the incomplete store with root `attrs` to resume it, or create it afresh; returns the root group
    and the first token to trace."""
    with io_errors(out, "preparing the store"):
        return _open_or_create(out, attrs, prov, layout, resume, overwrite, progress)


def _open_or_create(out: Path, attrs: dict | None, prov: dict, layout: Layout, resume: bool, overwrite: bool,
                    progress: bool) -> tuple[zarr.Group, int]:
    if attrs is not None and not overwrite:
        committed = attrs.get("committed_tokens", 0)
        if committed > 0:
            if not resume:
                raise StoreError(f"{out} holds an incomplete trace ({committed:,} of {attrs['tokens_total']:,} "
                                 "tokens); pass resume=True to continue it or overwrite=True to replace it")
            differ = [key for key in IDENTITY if attrs.get(key) != prov.get(key)]
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
            root = zarr.open_group(out, mode="r+")
            # the committed prefix is kept as it is: a resumed store reads whole only if it does
            damage = damaged(root, committed, progress)
            if damage:
                listed = "; ".join(map(str, damage[:3])) + (f"; and {len(damage) - 3} more" if len(damage) > 3 else "")
                raise StoreError(f"{out} cannot be resumed: {len(damage)} chunk(s) of its committed tokens cannot be "
                                 f"read ({listed}). {REMEDY}")
            return root, committed
    _clear(out)
    return _create(out, prov, layout), 0


def _create(out: Path, prov: dict, layout: Layout) -> zarr.Group:
    """A new store with every array laid out and nothing committed."""
    root = zarr.create_group(out, zarr_format=3, attributes=prov)
    n = prov["tokens_total"]
    if layout.layers:
        root.create_array("layer", data=np.asarray(layout.layers, dtype=np.int64), compressors=CODECS,
                          dimension_names=("layer",))
    marks = [(GENERATED, np.dtype(bool), False)] if prov.get("generation") else []
    for name, dtype, fill in (("token", np.dtype(np.int64), -1), (INPUT_IDS, DTYPES[INPUT_IDS], -1), *marks):
        root.create_array(name, shape=(n,), chunks=(layout.token_chunk,), dtype=dtype, fill_value=fill,
                          compressors=CODECS, dimension_names=("token",))
    for v in layout.variables:
        root.create_array(v.name, shape=v.shape, chunks=v.chunks, dtype=v.dtype, fill_value=v.fill,
                          compressors=CODECS, dimension_names=v.dims, attributes={"hook": v.hook})
    return root


def crash_point() -> tuple[int, str] | None:
    """The (trace chunk, point) at which `CRASH_ENV` asks the writer to kill itself; None: nowhere."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    chunk, point = spec.split(":")
    return int(chunk), point


def crash_here(crash: tuple[int, str] | None, chunk: int, point: str) -> None:
    """SIGKILL this process if `crash` names this chunk and point."""
    if crash == (chunk, point):
        os.kill(os.getpid(), signal.SIGKILL)
