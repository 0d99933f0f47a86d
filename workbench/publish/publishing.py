"""Publishing: execute a notebook in a fresh kernel (its own, over Unix sockets) and write it, executed, with a
self-contained HTML rendering and a manifest of everything its results rest on (`workbench.provenance`).

Published folder:
- `<name>.ipynb`: the executed notebook (papermill; widget state kept in its metadata where widgets were shown);
- `<name>.html`: the same rendered by nbconvert for viewing with no kernel and no network: plotly figures carry
  plotly.js inline (the kernel runs with PLOTLY_RENDERER="plotly_mimetype+notebook", which embeds it once, in
  the first figure's output), and the page loads no script from a CDN (no require.js, MathJax, mermaid or the
  widget HTML manager: TeX stays as source text; a `<script src>` from the network inside an output, such as
  the MathJax that plotly's figures name, is left out of the HTML). Widgets (ipywidgets, anywidget) cannot run
  without a kernel or the CDN widget manager, so the HTML shows each one's static fallback: its `text/html`
  representation where it offers one, else its `text/plain` repr. Their live state stays in the .ipynb;
- `source/<name>.ipynb`: the notebook as given (byte for byte), which `verify` re-executes;
- `manifest.json` (layout below).

Besides the kernel's provenance records (models, inputs, seeds, traces, environment), the manifest holds the
notebook's sha256 (before execution) and folder, its parameters (the `parameters` cell's defaults with the given
values injected, papermill's convention), the kernel, and workbench's version and git commit (where it runs from
a git checkout). Seeds are the parameters whose name contains "seed", the seeds given to `trace(..., seed=)` and
`record_seed`'s.

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
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import provenance
from ..provenance import relative
from ..checkpoint import sha256

MANIFEST = "manifest.json"
FORMAT = 1
DEFAULT_TIMEOUT = 3600.0  # seconds per cell
PLOTLY_RENDERER = "plotly_mimetype+notebook"  # JupyterLab draws the mime bundle; exported HTML gets plotly.js inline
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
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256(p) for p in (executed, html, source)}
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
        with _run_lock, _environ({provenance.LOG_ENV: log, "PLOTLY_RENDERER": PLOTLY_RENDERER}), \
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


def _manifest(source: Path, folder: Path, given: Mapping[str, Any], kernel: str, records: list[dict]) -> dict:
    """The manifest of one execution of `source` in `folder` from the records its kernel wrote."""
    folder = folder.resolve()
    env = next((r for r in records if r["kind"] == "environment"), None) or provenance.environment()
    parameters = _parameters(source, given)
    seeds = {k: v for k, v in parameters.items() if "seed" in k.lower()}
    models, inputs, traces = [], {}, []
    for r in records:
        if r["kind"] == "model":
            models.append({
                "source": relative(r["source"], folder) if Path(r["source"]).is_absolute() else r["source"],
                "revision": r["revision"], "commit": r["commit"], "folder": relative(r["folder"], folder),
                "dtype": r["dtype"], "device": r["device"], "backend": r["backend"],
                "config_sha256": r["config_sha256"], "weights": r["weights"], "config": r["config"],
                "tokenizer": r["tokenizer"]})
        elif r["kind"] == "input":
            inputs.setdefault(relative(r["path"], folder), r["sha256"])
        elif r["kind"] == "seed":
            seeds[r["name"]] = r["value"]
        elif r["kind"] == "trace":
            t: dict[str, Any] = {"index": len(traces) + 1, "origin": r["origin"]}
            if r["origin"] == "store":
                t["path"] = relative(r["path"], folder)
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
        "notebook": {"name": source.name, "folder": str(folder), "sha256": sha256(source),
                     "source": f"source/{source.name}"},
        "parameters": parameters,
        "parameters_given": json.loads(json.dumps(dict(given), default=str)),
        "kernel": kernel,
        "workbench": provenance.workbench_source(),
        "versions": env["versions"],
        "hardware": env["hardware"],
        "models": models,
        "inputs": inputs,
        "seeds": seeds,
        "traces": traces,
    }


