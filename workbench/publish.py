"""Reproducible analyses: `publish` executes a notebook in a fresh kernel and writes it, executed, with a
self-contained HTML rendering and a manifest of everything its results rest on; `verify` re-executes it and
says what, if anything, came out differently.

Published folder:
- `<name>.ipynb`: the executed notebook (papermill; widget state kept in its metadata where widgets were shown);
- `<name>.html`: the same rendered by nbconvert for viewing with no kernel and no network: plotly figures carry
  plotly.js inline (the kernel runs with PLOTLY_RENDERER="plotly_mimetype+notebook", which embeds it once, in
  the first figure's output), and the page loads no script from a CDN (no require.js, MathJax, mermaid or the
  widget HTML manager: TeX stays as source text; a `<script src>` from the network inside an output, such as
  the MathJax that plotly's figures name, is left out of the HTML). Widgets (ipywidgets, anywidget) cannot run without a kernel
  or the CDN widget manager, so the HTML shows each one's static fallback: its `text/html` representation
  where it offers one, else its `text/plain` repr. Their live state stays in the .ipynb;
- `source/<name>.ipynb`: the notebook as given (byte for byte), which `verify` re-executes;
- `manifest.json` (layout below).

What the manifest records and how. While the notebook runs, $WORKBENCH_PUBLISH_LOG names a JSON-lines file;
`record(kind, **fields)` appends one line to it, and does nothing at all when the variable is unset. Workbench
calls it at these points:
- `workbench.load`, after a successful load: source, revision, resolved hub commit, the sha256 of every weight
  file, config file and tokenizer file of the checkpoint folder (the loader's per-file digests, reused where it
  already hashed a file), the parsed config's hash (as stores record it), dtype, device and backend;
- `workbench.trace` / `model.trace`, at the end of a successful run: the store's path, its seed and its
  `routing_hash`; `analysis.from_cache`: a sequence number and the Dataset's `routing_hash`;
- `record_input(path)`: an input file the notebook reads (path relative to the notebook's folder, sha256);
- `record_seed(name, value)`: a seed the notebook uses.
Besides those, the manifest holds the notebook's sha256 (before execution) and folder, its parameters (the
`parameters` cell's defaults with the given values injected, papermill's convention), the kernel, workbench's
version and git commit (where it runs from a git checkout), package versions and hardware as the kernel saw them.
Seeds are the parameters whose name contains "seed", the seeds given to `trace(..., seed=)` and `record_seed`'s.

`routing_hash(ds)` is the sha256 of a routing Dataset's `layer` coordinate and of the raw little-endian bytes of
`input_ids`, `topk_ids` and `topk_weights` in token order (token-major: each token's layers and ranks together),
so a store and a `from_cache` Dataset of the same routing hash alike whatever their chunking. Each trace also
keeps `ids_sha256`, the same over `input_ids` and `topk_ids` alone, so that a difference confined to the routing
weights is told apart from a change of the selected experts.

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

Manifest layout (format 1):
    {"format": 1, "published": ISO time,
     "notebook": {"name", "folder" (absolute), "sha256", "source": "source/<name>.ipynb"},
     "parameters": {name: value}, "parameters_given": {name: value}, "kernel": name,
     "workbench": {"version", "commit", "dirty"}, "versions": {package: version}, "hardware": {...},
     "models": [{"source", "revision", "commit", "folder", "dtype", "device", "backend", "config_sha256",
                 "weights": {file: sha256}, "config": {file: sha256}, "tokenizer": {file: sha256}}],
     "inputs": {path: sha256}, "seeds": {name: value},
     "traces": [{"index", "origin": "store" | "from_cache", "path" | "seq", "label", "tokens", "seed",
                 "routing_sha256", "ids_sha256"}],
     "files": {published file: sha256}, "execution": {"wall_s", "timeout_s"}}
Paths inside the notebook's folder are written relative to it, others absolute.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

LOG_ENV = "WORKBENCH_PUBLISH_LOG"
MANIFEST = "manifest.json"
FORMAT = 1
DEFAULT_TIMEOUT = 3600.0  # seconds per cell
PLOTLY_RENDERER = "plotly_mimetype+notebook"  # JupyterLab draws the mime bundle; exported HTML gets plotly.js inline
PACKAGES = ("torch", "numpy", "xarray", "zarr", "dask", "numba", "plotly", "safetensors", "tokenizers",
            "huggingface_hub", "ipywidgets", "nbclient", "nbconvert", "papermill", "ipykernel")
CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ROUTING_VARIABLES = ("input_ids", "topk_ids", "topk_weights")
HASH_BLOCK_TOKENS = 1 << 16  # tokens read at a time while hashing a routing trace
# a script an output loads from the network (plotly's figures name MathJax on a CDN): it cannot load offline
NETWORK_SCRIPT = re.compile(r"""<script\b[^>]*\bsrc\s*=\s*["']?(?:https?:)?//[^>]*>\s*</script\s*>""", re.IGNORECASE)
OFFLINE_TEMPLATE = "workbench_offline.html.j2"
# the lab template without its CDN scripts (require.js, MathJax, mermaid, the widget HTML manager)
OFFLINE_TEMPLATE_SOURCE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


class PublishError(ValueError):
    """A notebook cannot be published or a published folder cannot be verified as asked."""


class NotebookError(PublishError):
    """A cell of the notebook failed (or timed out, or its kernel died); the message names the cell."""

    def __init__(self, notebook: str, summary: str, detail: str = ""):
        self.notebook, self.summary, self.detail = notebook, summary, detail
        super().__init__(f"{notebook}: {summary}" + (f"\n{detail}" if detail else ""))


class ReproducibilityWarning(UserWarning):
    """Something that may explain a difference changed since publishing (package versions, hardware, ...)."""


# ---------------------------------------------------------------- recording (inside the executing kernel)

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
        record("input", path=str(p.resolve()), sha256=_file_sha256(p))
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
    weights = {_name(Path(f), folder): _file_sha256(Path(f)) for f in sorted(weight_files)}
    config = {n: _file_sha256(folder / n) for n in CONFIG_FILES if (folder / n).is_file()}
    tokenizer = {n: _file_sha256(folder / n) for n in TOKENIZER_FILES if (folder / n).is_file()}
    embed = getattr(model, "embed", None)
    weight = getattr(embed, "weight", None)
    record("model", source=str(model.source), revision=model.revision, commit=model.commit,
           folder=str(folder.resolve()), weights=weights, config=config, tokenizer=tokenizer,
           config_sha256=hashlib.sha256(json.dumps(model.config.data, sort_keys=True).encode()).hexdigest(),
           dtype=None if weight is None else str(weight.dtype).removeprefix("torch."),
           device=None if weight is None else str(weight.device), backend=getattr(model, "backend", None))


def record_store(path: str | Path, seed: Any = None) -> None:
    """Record a finished trace store (called by `workbench.trace`): its routing hash and seed."""
    if not active():
        return
    from .store import open_store

    ds = open_store(path)
    record("trace", origin="store", path=str(Path(path).resolve()), seed=seed,
           tokens=int(ds.sizes.get("token", 0)), **_trace_hashes(ds))


def record_dataset(ds: Any) -> None:
    """Record a routing Dataset built in memory (called by `analysis.from_cache`), numbered in build order."""
    global _from_cache_count
    if not active():
        return
    _from_cache_count += 1
    record("trace", origin="from_cache", seq=_from_cache_count, tokens=int(ds.sizes.get("token", 0)),
           **_trace_hashes(ds))


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


def _file_sha256(path: Path) -> str:
    from .checkpoint import sha256  # remembered per file for this process: a file the loader hashed is not reread

    return sha256(Path(path))


def _name(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


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


# ---------------------------------------------------------------- publishing


def parse_value(text: str) -> Any:
    """A parameter given as text on the command line: True, False, None, an int or a float where it reads as
    one, else the string itself."""
    special = {"True": True, "False": False, "None": None}
    if text in special:
        return special[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def publish(notebook: str | os.PathLike, out: str | os.PathLike, parameters: Mapping[str, Any] | None = None,
            timeout: float | None = DEFAULT_TIMEOUT, kernel: str | None = None) -> Path:
    """Execute `notebook` in a fresh kernel (cwd: its folder; `parameters` injected after its cell tagged
    `parameters`) and write the executed notebook, its HTML and `manifest.json` to the folder `out`.

    `timeout` is per cell, in seconds (None: no limit); `kernel` defaults to the notebook's kernelspec. A failing
    cell raises `NotebookError` naming it, and leaves `out` as it was: everything is written to a temporary
    folder beside `out` and renamed into place at the end (a previous publication at `out` is replaced).
    Returns `out`.
    """
    nb_path = Path(notebook).expanduser().resolve()
    if not nb_path.is_file():
        raise PublishError(f"{notebook}: no such notebook")
    out = Path(out).expanduser().absolute()
    _check_out(out)
    raw = nb_path.read_bytes()
    kernel = kernel or _kernelspec(raw, nb_path)
    given = dict(parameters or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.publishing-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # a folder like any other, not mkdtemp's private one
        source = tmp / "source" / nb_path.name
        source.parent.mkdir()
        source.write_bytes(raw)
        executed = tmp / f"{nb_path.stem}.ipynb"
        records, wall = _execute(source, nb_path.parent, given, timeout, kernel, executed, label=str(notebook))
        html = tmp / f"{nb_path.stem}.html"
        html.write_text(to_html(executed), encoding="utf-8")
        manifest = _manifest(source, nb_path.parent, given, kernel, records)
        manifest["execution"] = {"wall_s": round(wall, 3), "timeout_s": timeout}
        manifest["files"] = {p.relative_to(tmp).as_posix(): _sha256_bytes(p.read_bytes())
                             for p in (executed, html, source)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise PublishError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise PublishError(f"{out} is not empty and holds no {MANIFEST}: not a published analysis; refusing to "
                               "replace it (publish into a new or empty folder)")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`, replacing a previous publication there."""
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _kernelspec(raw: bytes, path: Path) -> str:
    import nbformat

    try:
        nb = nbformat.reads(raw.decode("utf-8"), as_version=4)
    except Exception as e:  # nbformat raises several kinds for a file that is not a notebook
        raise PublishError(f"{path}: not a readable notebook ({type(e).__name__}: {e})") from None
    return nb.metadata.get("kernelspec", {}).get("name") or "python3"


_run_lock = threading.Lock()  # the kernel's environment is set through this process's os.environ


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _execute(source: Path, folder: Path, given: Mapping[str, Any], timeout: float | None, kernel: str,
             output: Path, label: str) -> tuple[list[dict], float]:
    """Run `source` with papermill (cwd `folder`) into `output`; returns the kernel's records and the wall time."""
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    fd, log = tempfile.mkstemp(prefix="workbench-publish-", suffix=".jsonl")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        with _run_lock, _environ({LOG_ENV: log, "PLOTLY_RENDERER": PLOTLY_RENDERER}), \
                tempfile.TemporaryDirectory(prefix="workbench-kernel-") as sockets:
            try:
                papermill.execute_notebook(
                    str(source), str(output), parameters=dict(given), kernel_name=kernel, cwd=str(folder),
                    progress_bar=False, log_output=False, request_save_on_cell_execute=False,
                    execution_timeout=None if timeout is None or timeout <= 0 else timeout, start_timeout=120,
                    kernel_manager_class=_private_kernel(Path(sockets)))
            except PapermillExecutionError as e:
                raise NotebookError(label, f"cell {e.cell_index} (In [{e.exec_count}]) raised {e.ename}: "
                                           f"{_one_line(e.evalue)}", str(e).strip()) from None
            except CellTimeoutError as e:
                raise NotebookError(label, f"a cell ran past the {timeout} s timeout ({_one_line(str(e))})") from None
            except DeadKernelError as e:
                raise NotebookError(label, f"the kernel died ({_one_line(str(e))})") from None
        wall = time.perf_counter() - t0
        return _read_log(Path(log)), wall
    finally:
        Path(log).unlink(missing_ok=True)


def _private_kernel(folder: Path) -> type:
    """A kernel manager talking to its kernel over Unix sockets in `folder` (a private temporary folder, mode
    0700) instead of localhost TCP, which any local user could listen to."""
    from jupyter_client.manager import KernelManager

    if os.name != "posix":  # no Unix sockets: jupyter's default
        return KernelManager

    class PrivateKernelManager(KernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(transport="ipc", ip=str(folder / "kernel"), **kwargs)

    return PrivateKernelManager


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _read_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def to_html(notebook: str | os.PathLike) -> str:
    """The executed notebook as one HTML page that needs no kernel and no network (see the module docstring)."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    path = Path(notebook)
    nb = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)  # no widget state: each widget output falls back to its static representation
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if isinstance(data.get("text/html"), (str, list)):
                text = data["text/html"] if isinstance(data["text/html"], str) else "".join(data["text/html"])
                data["text/html"] = NETWORK_SCRIPT.sub("", text)
    exporter = HTMLExporter(template_name="lab", template_file=OFFLINE_TEMPLATE,
                            extra_loaders=[jinja2.DictLoader({OFFLINE_TEMPLATE: OFFLINE_TEMPLATE_SOURCE})])
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem, "path": str(path.parent)}})
    return body


# ---------------------------------------------------------------- the manifest


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rel(path: str, folder: Path) -> str:
    p = Path(path)
    try:
        return p.relative_to(folder).as_posix() or "."
    except ValueError:
        return str(p)


def _parameters(source: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters the notebook ran with: its `parameters` cell's defaults (literals as values, anything else
    as {"expression": source text}), overridden by the given ones."""
    import papermill

    effective: dict[str, Any] = {}
    try:
        defaults = papermill.inspect_notebook(str(source))
    except Exception:  # a notebook without a parameters cell (or in a language papermill cannot inspect)
        defaults = {}
    for name, info in defaults.items():
        text = str(info.get("default", ""))
        try:
            effective[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            effective[name] = {"expression": text}
    effective.update(given)
    return json.loads(json.dumps(effective, default=str))


def _workbench() -> dict[str, Any]:
    """Workbench's version, and the commit (and whether the tree differs from it) of its git checkout, if any."""
    import workbench

    root = Path(workbench.__file__).resolve().parent.parent
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
    return {"version": workbench.__version__, "commit": commit, "dirty": dirty}


def _manifest(source: Path, folder: Path, given: Mapping[str, Any], kernel: str, records: list[dict]) -> dict:
    """The manifest of one execution of `source` in `folder` from the records its kernel wrote."""
    folder = folder.resolve()
    env = next((r for r in records if r["kind"] == "environment"), None) or environment()
    parameters = _parameters(source, given)
    seeds = {k: v for k, v in parameters.items() if "seed" in k.lower()}
    models, inputs, traces = [], {}, []
    for r in records:
        if r["kind"] == "model":
            models.append({
                "source": _rel(r["source"], folder) if Path(r["source"]).is_absolute() else r["source"],
                "revision": r["revision"], "commit": r["commit"], "folder": _rel(r["folder"], folder),
                "dtype": r["dtype"], "device": r["device"], "backend": r["backend"],
                "config_sha256": r["config_sha256"], "weights": r["weights"], "config": r["config"],
                "tokenizer": r["tokenizer"]})
        elif r["kind"] == "input":
            inputs.setdefault(_rel(r["path"], folder), r["sha256"])
        elif r["kind"] == "seed":
            seeds[r["name"]] = r["value"]
        elif r["kind"] == "trace":
            t: dict[str, Any] = {"index": len(traces) + 1, "origin": r["origin"]}
            if r["origin"] == "store":
                t["path"] = _rel(r["path"], folder)
                t["label"] = t["path"]
            else:
                t["seq"] = r["seq"]
                t["label"] = f"from_cache #{r['seq']}"
            t.update(tokens=r["tokens"], seed=r.get("seed"), routing_sha256=r["routing_sha256"],
                     ids_sha256=r["ids_sha256"])
            if t["seed"] is not None:
                seeds[f"trace {t['index']} ({t['label']})"] = t["seed"]
            traces.append(t)
    return {
        "format": FORMAT,
        "published": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notebook": {"name": source.name, "folder": str(folder), "sha256": _sha256_bytes(source.read_bytes()),
                     "source": f"source/{source.name}"},
        "parameters": parameters,
        "parameters_given": json.loads(json.dumps(dict(given), default=str)),
        "kernel": kernel,
        "workbench": _workbench(),
        "versions": env["versions"],
        "hardware": env["hardware"],
        "models": models,
        "inputs": inputs,
        "seeds": seeds,
        "traces": traces,
    }


# ---------------------------------------------------------------- verifying


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
        elif _sha256_bytes(path.read_bytes()) != want:
            out.append(f"published file changed since publishing: {name}")
    return out


def _fmt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _short(sha: str | None) -> str:
    return "none" if sha is None else sha[:12] + "..."


def _compare_values(what: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new), key=str):
        if key not in new:
            out.append(f"{what} no longer recorded: {key} (was {_fmt(old[key])})")
        elif key not in old:
            out.append(f"{what} recorded only on re-execution: {key} = {_fmt(new[key])}")
        elif old[key] != new[key]:
            out.append(f"{what} changed: {key} {_fmt(old[key])} -> {_fmt(new[key])}")
    return out


def _compare_files(what: str, folder: str, old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    out = []
    for name in sorted(set(old) | set(new)):
        where = f"{folder.rstrip('/')}/{name}"
        if name not in new:
            out.append(f"{what} file gone: {where}")
        elif name not in old:
            out.append(f"{what} file new: {where} sha256 {_short(new[name])}")
        elif old[name] != new[name]:
            out.append(f"{what} changed: {where} sha256 {_short(old[name])} -> {_short(new[name])}")
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
    diffs += _compare_values("parameter", params_old, params_new)
    diffs += _compare_values("seed", seeds_old, seeds_new)
    wb_old, wb_new = old.get("workbench", {}), new.get("workbench", {})
    if wb_old.get("version") != wb_new.get("version"):
        diffs.append(f"workbench version changed: {wb_old.get('version')} -> {wb_new.get('version')}")
    if (wb_old.get("commit"), wb_old.get("dirty")) != (wb_new.get("commit"), wb_new.get("dirty")):
        def tree(w: dict) -> str:
            return f"{w.get('commit')}{' with local changes' if w.get('dirty') else ''}"
        notes.append(f"workbench source changed: {tree(wb_old)} -> {tree(wb_new)}")
    diffs += _compare_models(old.get("models", []), new.get("models", []), notes)
    diffs += _compare_inputs(old.get("inputs", {}), new.get("inputs", {}))
    diffs += _compare_traces(old.get("traces", []), new.get("traces", []))
    notes += [f"package version changed: {line.split(': ', 1)[1]}"
              for line in _compare_values("package", old.get("versions", {}), new.get("versions", {}))]
    notes += [f"hardware changed: {line.split(': ', 1)[1]}"
              for line in _compare_values("hardware", old.get("hardware", {}), new.get("hardware", {}))]
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
        folder = a.get("folder", "")
        diffs += _compare_files("weights", folder, a.get("weights", {}), b.get("weights", {}))
        diffs += _compare_files("config", folder, a.get("config", {}), b.get("config", {}))
        diffs += _compare_files("tokenizer", folder, a.get("tokenizer", {}), b.get("tokenizer", {}))
    return diffs


def _compare_inputs(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    diffs = []
    for path in sorted(set(old) | set(new)):
        if path not in new:
            diffs.append(f"input no longer read: {path}")
        elif path not in old:
            diffs.append(f"input read only on re-execution: {path} sha256 {_short(new[path])}")
        elif old[path] != new[path]:
            diffs.append(f"input changed: {path} sha256 {_short(old[path])} -> {_short(new[path])}")
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
