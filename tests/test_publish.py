"""`workbench publish` / `verify`: a tiny analysis notebook is executed with papermill, written as executed notebook,
offline HTML and manifest, and re-executed by verify, which must pass untouched and name what changed when one
byte of the weights, one byte of the input text or the seed changes."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

import workbench as wb
from workbench import analysis, provenance
from workbench import publish as pub
from workbench.demo import EMBEDDED_MODEL

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("WORKBENCH_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "publish"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TEXT = "The router sends each token to a few experts; this text is the analysis' input.\n"
FROM_CACHE_TOKENS = 40

PARAMETERS = 'seed = 0\ntext_file = "input.txt"'
ANALYSIS = f"""\
import numpy as np
import plotly.graph_objects as go
import torch

import workbench as wb
from workbench import analysis
from workbench.publish import record_input

model = wb.load("model", dtype=torch.float32)
text = record_input(text_file).read_text(encoding="utf-8")
# the input text, then random tokens drawn from the seed: both matter to the routing
text_ids = model.tokenizer.encode(text)
ids = np.concatenate([text_ids, np.random.default_rng(seed).integers(0, model.vocab_size, 100 - len(text_ids))])
store = model.trace(ids, out="run.zarr", seed=seed, overwrite=True, progress=False)
ds = wb.open_store(store)
_, cache = model.run_with_cache(torch.as_tensor(ids[:{FROM_CACHE_TOKENS}])[None], names=["layers.*.router.topk_ids"])
mem = analysis.from_cache(cache, ids[:{FROM_CACHE_TOKENS}], n_experts=ds.attrs["n_experts"])
"""
FIGURE = """\
last = int(ds.layer[-1])
load = np.bincount(ds.topk_ids.sel(layer=last).values.ravel(), minlength=ds.attrs["n_experts"])
fig = go.Figure(go.Bar(x=list(range(len(load))), y=load))
fig.update_layout(title=f"expert load, layer {last}")
fig.show()
"""
WIDGET = """\
from workbench.widgets import TokenView

TokenView(ds, start=10, length=30)
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_notebook(path: Path, parameters: str | None, *cells: str) -> Path:
    code = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})] if parameters else []
    code += [nbformat.v4.new_code_cell(c) for c in cells]
    nb = nbformat.v4.new_notebook(cells=code, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                        "language": "python"}})
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder with the analysis notebook, its input text and a copy of the embedded model. SHA256SUMS is left
    out: the tests alter the weights, which the loader would otherwise refuse against the recorded checksum."""
    folder = tmp_path_factory.mktemp("project")
    (folder / "model").mkdir()
    for name in MODEL_FILES:
        shutil.copyfile(EMBEDDED_MODEL / name, folder / "model" / name)
    (folder / "input.txt").write_text(TEXT, encoding="utf-8")
    write_notebook(folder / "analysis.ipynb", PARAMETERS, ANALYSIS, FIGURE, WIDGET)
    return folder


@pytest.fixture(scope="module")
def published(project, tmp_path_factory):
    """(published folder, routing hash of the store as the publication left it)."""
    out = pub.publish(project / "analysis.ipynb", tmp_path_factory.mktemp("site") / "analysis", timeout=600)
    return out, provenance.routing_hash(wb.open_store(project / "run.zarr"))


@pytest.fixture
def altered(project):
    """alter(relative path, offset, xor mask): change one byte of a project file, restored after the test."""
    saved = {}

    def alter(name: str, offset: int, mask: int) -> None:
        path = project / name
        data = bytearray(path.read_bytes())
        saved.setdefault(path, bytes(data))
        data[offset] ^= mask
        path.write_bytes(bytes(data))

    yield alter
    for path, data in saved.items():
        path.write_bytes(data)


def test_publish_writes_notebook_html_and_manifest(project, published):
    out, store_hash = published
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "analysis.html", "analysis.ipynb", "manifest.json", "source/analysis.ipynb"]
    m = json.loads((out / "manifest.json").read_text())
    assert (out / "source" / "analysis.ipynb").read_bytes() == (project / "analysis.ipynb").read_bytes()
    assert m["notebook"] == {"name": "analysis.ipynb", "folder": str(project.resolve()),
                             "sha256": sha256(project / "analysis.ipynb"), "source": "source/analysis.ipynb"}
    assert m["parameters"] == {"seed": 0, "text_file": "input.txt"} and m["parameters_given"] == {}
    assert m["kernel"] == "python3"
    assert m["workbench"]["version"] == wb.__version__
    assert {"torch", "numpy", "xarray", "zarr", "numba", "plotly", "safetensors", "tokenizers", "huggingface_hub",
            "nbclient", "papermill", "python"} <= set(m["versions"])
    assert m["versions"]["torch"] == torch.__version__
    assert {"platform", "machine", "processor", "cpu_count", "torch_threads", "cuda_devices"} <= set(m["hardware"])
    (model,) = m["models"]
    assert model["folder"] == "model" and model["source"] == "model" and model["commit"] is None
    assert (model["dtype"], model["device"], model["backend"]) == ("float32", "cpu", "grouped")
    assert model["weights"] == {"model.safetensors": sha256(project / "model" / "model.safetensors")}
    assert model["config"] == {"config.json": sha256(project / "model" / "config.json")}
    assert model["tokenizer"] == {"tokenizer.json": sha256(project / "model" / "tokenizer.json")}
    assert m["inputs"] == {"input.txt": sha256(project / "input.txt")}
    assert m["seeds"] == {"seed": 0, "trace 1 (run.zarr)": 0}
    store, mem = m["traces"]
    assert {k: store[k] for k in ("index", "origin", "path", "tokens", "seed")} == {
        "index": 1, "origin": "store", "path": "run.zarr", "tokens": 100, "seed": 0}
    assert store["routing_sha256"] == store_hash
    assert {k: mem[k] for k in ("index", "origin", "seq", "label", "tokens")} == {
        "index": 2, "origin": "from_cache", "seq": 1, "label": "from_cache #1", "tokens": FROM_CACHE_TOKENS}
    # the in-memory trace hashes as the same routing rebuilt here (float32 on one thread, as in the kernel)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = wb.open_store(project / "run.zarr").input_ids.values[:FROM_CACHE_TOKENS].astype(np.int64)
        model = wb.load(project / "model", dtype=torch.float32)
        _, cache = model.run_with_cache(torch.as_tensor(ids)[None], names=["layers.*.router.topk_ids"])
    finally:
        torch.set_num_threads(threads)
    assert mem["routing_sha256"] == provenance.routing_hash(analysis.from_cache(cache, ids, n_experts=32))
    assert m["files"] == {name: sha256(out / name)
                          for name in ("analysis.ipynb", "analysis.html", "source/analysis.ipynb")}
    executed = nbformat.read(out / "analysis.ipynb", as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 1 and "text/html" in figures[0].data
    html = (out / "analysis.html").read_text(encoding="utf-8")
    assert html.count("plotly.js v") == 1 and "Plotly.newPlot" in html  # plotly.js inline, once
    assert not pub.NETWORK_SCRIPT.search(html)  # no script from a CDN


def test_routing_hash_is_layout_independent_and_sensitive(project, published):
    ds = wb.open_store(project / "run.zarr")
    mem = ds.load()
    assert provenance.routing_hash(mem) == provenance.routing_hash(ds)
    changed = mem.copy(deep=True)
    changed.topk_weights[0, 5, 0] = np.float16(changed.topk_weights.values[0, 5, 0]) + np.float16(0.001)
    assert provenance.routing_hash(changed) != provenance.routing_hash(mem)


def test_verify_untouched_publication(published):
    out, _ = published
    assert pub.verify(out, timeout=600) == []


def test_verify_names_changed_weights(project, published, altered):
    out, _ = published
    before = sha256(project / "model" / "model.safetensors")
    # the file's last byte is the high byte of its last tensor's last value (bfloat16): flipping the sign bit
    # keeps the checkpoint loadable and finite
    altered("model/model.safetensors", -1, 0x80)
    after = sha256(project / "model" / "model.safetensors")
    differences = pub.verify(out, timeout=600)
    assert f"weights changed: model/model.safetensors sha256 {before[:12]}... -> {after[:12]}..." in differences
    assert not [d for d in differences if d.startswith(("input", "seed", "parameter", "notebook"))]


def test_verify_names_changed_input(project, published, altered):
    out, _ = published
    altered("input.txt", 0, 0x20)  # "The" -> "the"
    differences = pub.verify(out, timeout=600)
    assert any(d.startswith("input changed: input.txt sha256 ") for d in differences), differences
    assert any(d.startswith("routing trace 1 (run.zarr) differs") for d in differences), differences
    assert not [d for d in differences if d.startswith(("weights", "seed", "parameter", "notebook"))]


def test_verify_names_changed_seed(published):
    out, _ = published
    differences = pub.verify(out, timeout=600, parameters={"seed": 1})
    assert "seed changed: seed 0 -> 1" in differences
    assert "seed changed: trace 1 (run.zarr) 0 -> 1" in differences
    assert any(d.startswith("routing trace 1 (run.zarr) differs") for d in differences), differences
    assert not [d for d in differences if d.startswith(("weights", "input", "notebook"))]


def test_failing_cell_raises_and_writes_nothing(tmp_path):
    nb = write_notebook(tmp_path / "broken.ipynb", None, "x = 1", "raise ValueError('broken on purpose')")
    with pytest.raises(pub.NotebookError, match=r"cell 1 \(In \[2\]\) raised ValueError: broken on purpose"):
        pub.publish(nb, tmp_path / "out", timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ipynb"]  # no out, no temporary folder
    # a previous publication stays as it was
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    with pytest.raises(pub.NotebookError, match="Exception encountered at"):
        pub.publish(nb, tmp_path / "out", timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ipynb", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.json"]


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("WORKBENCH_REQUIRE_BROWSER"),
                    reason="no chromium (make test installs Debian's chromium where it can)")
def test_html_shows_the_figure_offline(published):
    from playwright.sync_api import sync_playwright

    out, _ = published
    requested = []

    def offline(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            requested.append(route.request.url)
            route.abort()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", offline)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((out / "analysis.html").as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
            assert page.locator(".js-plotly-plot .bars path").count() > 0
            # the token view, as its static snapshot: 30 coloured tokens with their routing on hover
            assert page.locator(".mwb-snapshot span[title^='token ']").count() == 30
            page.screenshot(path=str(ARTIFACTS / "analysis.png"), full_page=True)
        finally:
            browser.close()
    assert requested == [] and errors == []


def test_cli_publish_and_verify_exit_codes(tmp_path, monkeypatch, capsys):
    from workbench.cli import main

    (tmp_path / "data.txt").write_text("one two three\n")
    write_notebook(tmp_path / "count.ipynb", "n = 3",
                   "from workbench.publish import record_input, record_seed\n"
                   "words = record_input('data.txt').read_text().split()[:n]\nrecord_seed('shuffle', 7)\nwords")
    r = subprocess.run([sys.executable, "-m", "workbench", "publish", "count.ipynb", "--out", "site", "-p", "n", "2",
                        "--timeout", "300"], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.startswith("published count.ipynb"), r.stdout + r.stderr
    assert "TCP" not in r.stderr and not list(tmp_path.glob("kernel*"))  # Unix sockets in a private temp folder
    m = json.loads((tmp_path / "site" / "manifest.json").read_text())
    assert m["parameters"] == {"n": 2} and m["parameters_given"] == {"n": 2}
    assert m["seeds"] == {"shuffle": 7} and m["inputs"] == {"data.txt": sha256(tmp_path / "data.txt")}
    assert "['one', 'two']" in (tmp_path / "site" / "count.html").read_text()
    # `python -m workbench` exits with main's return value; verify runs in this process to save a start-up
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["verify", "site", "--timeout", "300"]) == 0
    assert capsys.readouterr().out.startswith("verified: site")
    (tmp_path / "data.txt").write_text("one two four\n")
    assert main(["verify", "site", "--timeout", "300"]) == 1
    assert "input changed: data.txt sha256 " in capsys.readouterr().out
    assert main(["verify", "nowhere"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_recording_is_off_outside_publish(tmp_path, monkeypatch):
    monkeypatch.delenv(provenance.LOG_ENV, raising=False)
    assert not provenance.active()
    provenance.record("input", path="x")  # nothing to write to, nothing raised
    assert provenance.record_seed("s", 3) == 3
    assert provenance.record_input(tmp_path / "missing.txt") == tmp_path / "missing.txt"  # not even read
    log = tmp_path / "log.jsonl"
    monkeypatch.setattr(provenance, "_env_written", None)
    monkeypatch.setenv(provenance.LOG_ENV, str(log))
    (tmp_path / "in.txt").write_text("x")
    provenance.record_input(tmp_path / "in.txt")
    provenance.record_seed("s", 3)
    kinds = [json.loads(line)["kind"] for line in log.read_text().splitlines()]
    assert kinds[-2:] == ["input", "seed"] and "environment" in kinds


def test_parse_value():
    assert [pub.parse_value(v) for v in ("1", "-2", "0.5", "True", "False", "None", "run.zarr")] == [
        1, -2, 0.5, True, False, None, "run.zarr"]
