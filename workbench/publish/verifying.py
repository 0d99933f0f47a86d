"""Verifying: re-execute a published notebook and say what, if anything, came out differently from its manifest.

Verification re-executes `source/<name>.ipynb` in the notebook's original folder (recorded in the manifest) with
the recorded parameters, so relative paths resolve as they did; whatever the notebook writes there (stores)
it writes again, and a notebook that traces into a store should pass `overwrite=True`. Differences (one line
each) are failures: the notebook, a parameter or seed, a model's weights, config or tokenizer, its dtype or
backend, an input file, a routing trace, the workbench version, or a published file altered since. Package
versions, the workbench commit, the kernel and hardware (platform, CPU count, torch threads, CUDA devices) are
reported as warnings (`ReproducibilityWarning`), because they may explain a difference but are not one.

Which traces are bit-reproducible: routing traces are deterministic for a given backend, dtype, machine and
thread count. The `torch` and `grouped` backends on CPU in float32 give identical top-k ids and weights run to
run with the same number of torch threads. A different BLAS, CPU or thread count changes the order of
floating-point sums, so the low bits of routing weights (and, at near-ties, an id) can differ across machines;
`verify` then reports the trace as differing, saying whether the top-k ids still agree. CUDA kernels (the
`triton` backend, cuBLAS) are repeatable on the same GPU model and software stack in practice but carry no such
promise across GPUs, drivers or library versions.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import sha256
from .publishing import DEFAULT_TIMEOUT, FORMAT, MANIFEST, NotebookError, PublishError, _execute, _manifest

# how a line says that a key is gone, new or changed: str.format templates over {what}, {key}, {old}, {new}
VALUE_LINES = ("{what} no longer recorded: {key} (was {old})", "{what} recorded only on re-execution: {key} = {new}",
               "{what} changed: {key} {old} -> {new}")
NOTE_LINES = ("{what} changed: {key} (was {old})", "{what} changed: {key} = {new}",
              "{what} changed: {key} {old} -> {new}")
FILE_LINES = ("{what} file gone: {key}", "{what} file new: {key} sha256 {new}",
              "{what} changed: {key} sha256 {old} -> {new}")
INPUT_LINES = ("{what} no longer read: {key}", "{what} read only on re-execution: {key} sha256 {new}",
               "{what} changed: {key} sha256 {old} -> {new}")


class ReproducibilityWarning(UserWarning):
    """Something that may explain a difference changed since publishing (package versions, hardware, ...)."""


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a published folder."""
    path = Path(directory).expanduser() / MANIFEST
    if not path.is_file():
        raise PublishError(f"{directory}: no {MANIFEST} here; not a folder written by `workbench publish`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PublishError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PublishError(f"{path}: manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
                           f" is not the format {FORMAT} this workbench reads")
    return manifest


def verify(directory: str | os.PathLike, *, timeout: float | None = DEFAULT_TIMEOUT, kernel: str | None = None,
           parameters: Mapping[str, Any] | None = None) -> list[str]:
    """Re-execute a published notebook (its source as published, in its original folder, with the recorded
    parameters, any in `parameters` overriding them) and compare what it loads, reads and traces with the
    manifest. Returns the differences, one line each; empty: verified. Changes that may explain a difference
    but are none themselves (package versions, hardware, kernel, workbench commit) are issued as
    `ReproducibilityWarning`s."""
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    differences = _published_files(directory, manifest)
    nb = manifest["notebook"]
    source = directory / nb["source"]
    if not source.is_file():
        return differences + [f"published source missing: {nb['source']}"]
    folder = Path(nb["folder"])
    if not folder.is_dir():
        return differences + [f"notebook folder missing: {folder} (verify re-executes the notebook there, so that "
                              "its relative paths resolve as when it was published)"]
    given = {**manifest.get("parameters_given", {}), **(parameters or {})}
    kernel = kernel or manifest["kernel"]
    with tempfile.TemporaryDirectory(prefix="workbench-verify-") as tmp:
        try:
            records, _ = _execute(source, folder, given, timeout, kernel, Path(tmp) / source.name, label=nb["source"])
        except NotebookError as e:
            return differences + [f"re-execution failed: {e.summary}"]
        fresh = _manifest(source, folder, given, kernel, records)
    found, notes = compare(manifest, fresh)
    for note in notes:
        warnings.warn(note, ReproducibilityWarning, stacklevel=2)
    return differences + found


def _published_files(directory: Path, manifest: dict) -> list[str]:
    out = []
    for name, want in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            out.append(f"published file missing: {name}")
        elif sha256(path) != want:
            out.append(f"published file changed since publishing: {name}")
    return out


def _fmt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _short(sha: str | None) -> str:
    return "none" if sha is None else sha[:12] + "..."


def _diff(what: str, old: Mapping[str, Any], new: Mapping[str, Any], lines: tuple[str, str, str],
          show: Callable[[Any], str] = _fmt) -> list[str]:
    """One line per key whose value differs between `old` and `new`, in key order, from the (gone, new,
    changed) templates of `lines`, with values written by `show`."""
    gone, added, changed = lines
    out = []
    for key in sorted(set(old) | set(new), key=str):
        if key not in new:
            out.append(gone.format(what=what, key=key, old=show(old[key])))
        elif key not in old:
            out.append(added.format(what=what, key=key, new=show(new[key])))
        elif old[key] != new[key]:
            out.append(changed.format(what=what, key=key, old=show(old[key]), new=show(new[key])))
    return out


def compare(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(differences, warnings) between a published manifest and one of a re-execution."""
    diffs: list[str] = []
    notes: list[str] = []
    if old["notebook"]["sha256"] != new["notebook"]["sha256"]:
        diffs.append(f"notebook changed: {old['notebook']['name']} sha256 {_short(old['notebook']['sha256'])} -> "
                     f"{_short(new['notebook']['sha256'])}")
    seeds_old, seeds_new = old.get("seeds", {}), new.get("seeds", {})
    params_old = {k: v for k, v in old.get("parameters", {}).items() if k not in seeds_old}
    params_new = {k: v for k, v in new.get("parameters", {}).items() if k not in seeds_new}
    diffs += _diff("parameter", params_old, params_new, VALUE_LINES)
    diffs += _diff("seed", seeds_old, seeds_new, VALUE_LINES)
    wb_old, wb_new = old.get("workbench", {}), new.get("workbench", {})
    if wb_old.get("version") != wb_new.get("version"):
        diffs.append(f"workbench version changed: {wb_old.get('version')} -> {wb_new.get('version')}")
    if (wb_old.get("commit"), wb_old.get("dirty")) != (wb_new.get("commit"), wb_new.get("dirty")):
        def tree(w: dict) -> str:
            return f"{w.get('commit')}{' with local changes' if w.get('dirty') else ''}"
        notes.append(f"workbench source changed: {tree(wb_old)} -> {tree(wb_new)}")
    diffs += _compare_models(old.get("models", []), new.get("models", []), notes)
    diffs += _diff("input", old.get("inputs", {}), new.get("inputs", {}), INPUT_LINES, show=_short)
    diffs += _compare_traces(old.get("traces", []), new.get("traces", []))
    notes += _diff("package version", old.get("versions", {}), new.get("versions", {}), NOTE_LINES)
    notes += _diff("hardware", old.get("hardware", {}), new.get("hardware", {}), NOTE_LINES)
    if old.get("kernel") != new.get("kernel"):
        notes.append(f"kernel changed: {old.get('kernel')} -> {new.get('kernel')}")
    return diffs, notes


def _compare_models(old: list[dict], new: list[dict], notes: list[str]) -> list[str]:
    diffs = []
    if len(old) != len(new):
        diffs.append(f"models loaded: {len(old)} recorded, {len(new)} on re-execution")
    for i, (a, b) in enumerate(zip(old, new), 1):
        name = f"model {i} ({a['source']})"
        for key in ("source", "revision", "commit", "dtype", "backend", "config_sha256"):
            if a.get(key) != b.get(key):
                if key == "config_sha256" and a.get("config") != b.get("config"):
                    continue  # the config file's own line says it
                diffs.append(f"{name} {key} changed: {_fmt(a.get(key))} -> {_fmt(b.get(key))}")
        if a.get("device") != b.get("device"):
            notes.append(f"{name} device changed: {a.get('device')} -> {b.get('device')}")
        folder = a.get("folder", "").rstrip("/")
        for what in ("weights", "config", "tokenizer"):
            old_files, new_files = ({f"{folder}/{n}": sha for n, sha in m.get(what, {}).items()} for m in (a, b))
            diffs += _diff(what, old_files, new_files, FILE_LINES, show=_short)
    return diffs


def _compare_traces(old: list[dict], new: list[dict]) -> list[str]:
    diffs = []
    if len(old) != len(new):
        diffs.append(f"routing traces: {len(old)} recorded, {len(new)} on re-execution")
    for a, b in zip(old, new):
        label = f"routing trace {a['index']} ({a['label']})"
        if a["label"] != b["label"]:
            diffs.append(f"{label} is now {b['label']}")
        if a["routing_sha256"] != b["routing_sha256"]:
            detail = []
            if a.get("tokens") != b.get("tokens"):
                detail.append(f"tokens {a.get('tokens')} -> {b.get('tokens')}")
            elif a.get("ids_sha256") == b.get("ids_sha256"):
                detail.append("the top-k ids agree; only the routing weights differ")
            else:
                detail.append("the tokens or top-k ids differ")
            diffs.append(f"{label} differs ({'; '.join(detail)})")
    return diffs
