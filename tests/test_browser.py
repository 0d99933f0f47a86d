"""End to end in a real browser: headless Chromium (Debian's, driven by Playwright) against a real `jupyter lab`
on localhost, started by `make lab`, with the installed extension. A saved routing display renders with no
kernel; the dashboard runs in a kernel, and a click on its load heatmap opens the expert's profile, whose top
tokens are checked against numpy over the store; a click on a token of the token view opens its expert's
profile; the comparison view of an fp32 and a bf16 trace shows the agreement numpy computes. Screenshots land
in ARTIFACTS."""

import os
import re
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

import workbench as wb
from workbench import analysis
from test_install import make_lab
from workbench.demo import EMBEDDED_MODEL
from workbench.widgets.figure import BUNDLE

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("WORKBENCH_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "workbench-test"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("WORKBENCH_REQUIRE_BROWSER"),
                                reason="no chromium (make test installs Debian's chromium where it can)")

NOTEBOOK = [
    "import workbench as wb\nds = wb.open_store('run.zarr')\nds",
    "from workbench.widgets import RoutingDashboard\ndash = RoutingDashboard('run.zarr', layer=2, expert=0)\ndash",
]


NOTEBOOKS = {
    "tokens.ipynb": ["from workbench.widgets import TokenView\nTokenView('run.zarr', layer=3, start=0, length=120)"],
    "comparison.ipynb": ["from workbench.widgets import RoutingComparison\n"
                         "RoutingComparison('run.zarr', 'bf16.zarr', names=('fp32', 'bf16'))"],
}


def notebook(cells: list[str]) -> nbformat.NotebookNode:
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells],
                                    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})


def run_all(page) -> None:
    """Run every cell of the notebook in view from the Run menu, once its kernel is idle (accepting the kernel
    JupyterLab proposes if it asks), until the first cell has started."""
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    prompt = panel.locator(".jp-Cell .jp-InputPrompt").first
    prompt.wait_for()
    for _ in range(240):
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        if accept.count():
            accept.first.click()
        if page.locator(".jp-StatusBar-Widget", has_text="| Idle").count():
            run = page.locator(".lm-MenuBar-item", has_text="Run").first
            run.click()
            item = page.locator('.lm-Menu-item[data-command="runmenu:run-all"]')
            if "lm-mod-disabled" not in (item.get_attribute("class") or ""):
                item.click()
                for _ in range(20):
                    if prompt.inner_text().strip() not in ("[ ]:", ""):
                        return
                    page.wait_for_timeout(500)
            else:
                run.click()  # closes the menu (Escape would also dismiss a kernel dialog: no kernel)
        page.wait_for_timeout(500)
    raise TimeoutError("the notebook did not start running within two minutes")


def wait(page, locator, what: str) -> None:
    """Wait for `locator` to show; on a timeout, a screenshot of the page in ARTIFACTS (failed-WHAT.png)."""
    try:
        locator.wait_for()
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"failed-{what}.png"), full_page=True)
        raise


def top_tokens(store: Path, layer: int, expert: int, n: int = 10) -> list[int]:
    """The input ids that take `expert` at `layer` most often (count, then id), by numpy over the store."""
    ds = wb.open_store(store)
    ids = ds.topk_ids.sel(layer=layer).values
    counts = np.bincount(ds.input_ids.values[(ids == expert).any(-1)], minlength=256)
    order = np.lexsort((np.arange(len(counts)), -counts))
    return [int(t) for t in order[:n] if counts[t] > 0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A folder with a traced store and a notebook whose first output is saved, served by `make lab`."""
    folder = tmp_path_factory.mktemp("lab")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    text = (ROOT / "data" / "corpus" / "prose.heldout.txt").read_bytes()[:600]
    tokens = np.frombuffer(text, np.uint8).astype(np.int64)
    wb.trace(model, tokens, folder / "run.zarr", progress=False)
    wb.trace(wb.load(EMBEDDED_MODEL, dtype=torch.bfloat16), tokens, folder / "bf16.zarr", progress=False)
    torch.set_num_threads(threads)
    for name, cells in NOTEBOOKS.items():
        nbformat.write(notebook(cells), folder / name)
    nb = notebook(NOTEBOOK[:1])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    nb.cells.append(nbformat.v4.new_code_cell(NOTEBOOK[1]))
    nbformat.write(nb, folder / "dashboard.ipynb")
    news = folder / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about Jupyter news?" box over the figures
    tracker = folder / ".settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text('{"autoStartDefaultKernel": true}')  # no "select kernel" box on a never-run notebook
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(folder / ".settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(folder / ".workspaces"), "OMP_NUM_THREADS": "1"}
    with make_lab(folder / "jupyter.log", TOKEN, lab_dir=folder, env=env) as url:
        yield url, folder


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        yield page
        browser.close()


def test_routing_display_dashboard_and_linked_click(lab, page):
    url, folder = lab
    page.goto(f"{url}/lab/tree/dashboard.ipynb?token={TOKEN}")
    # the saved output, drawn by the extension's renderer before any cell runs
    cells = page.locator(".mwb-routing .mwb-cell")
    cells.first.wait_for()
    assert cells.count() == 6 * 32
    assert "routing store" in page.locator(".mwb-routing .mwb-title").first.inner_text()
    fields = page.locator(".mwb-routing table.mwb-fields").first.inner_text()
    assert str(EMBEDDED_MODEL) in fields and "600" in fields
    page.screenshot(path=str(ARTIFACTS / "1-saved-routing-display.png"), full_page=True)

    run_all(page)
    titles = page.locator(".js-plotly-plot .gtitle")
    coact = titles.filter(has_text="co-activation, layer 2")
    coact.first.wait_for()
    bars = titles.filter(has_text="expert 0, layer 2")
    bars.first.wait_for()
    dashboard = page.locator(".jp-OutputArea-output", has=page.locator(".js-plotly-plot")).first
    dashboard.screenshot(path=str(ARTIFACTS / "2-dashboard.png"))

    # click the heatmap cell (layer 4, expert 20); rows run downwards from the first layer, columns are experts
    heatmap = page.locator(".js-plotly-plot").first
    area = heatmap.locator(".nsewdrag").first.bounding_box()
    layer, expert, layers, experts = 4, 20, 6, 32
    x = area["x"] + (expert + 0.5) / experts * area["width"]
    y = area["y"] + (layer + 0.5) / layers * area["height"]
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    page.mouse.click(x, y)
    titles.filter(has_text=f"co-activation, layer {layer}").first.wait_for()
    titles.filter(has_text=f"expert {expert}, layer {layer}").first.wait_for()
    dashboard.screenshot(path=str(ARTIFACTS / "3-after-click.png"))
    assert titles.filter(has_text="co-activation, layer 2").count() == 0
    # the profile's top tokens, as the browser shows them, against numpy over the store
    table = page.locator("table.mwb-profile-tokens").first
    table.wait_for()
    shown = [int(x) for x in table.locator("td.mwb-token").evaluate_all("cells => cells.map(c => c.dataset.tokenId)")]
    assert shown == top_tokens(folder / "run.zarr", layer, expert)
    table.screenshot(path=str(ARTIFACTS / "3b-profile-top-tokens.png"))


def test_clicking_a_token_opens_its_experts_profile(lab, page):
    url, folder = lab
    page.goto(f"{url}/lab/workspaces/tokens/tree/tokens.ipynb?token={TOKEN}")  # a workspace of its own
    run_all(page)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")  # other notebooks stay open in hidden tabs
    token = panel.locator(".mwb-tokens span.mwb-token[data-pos='42']")
    wait(page, token, "token-view")
    expert = int(wb.open_store(folder / "run.zarr").topk_ids.sel(layer=3).values[42, 0])
    token.click()
    title = panel.locator(".js-plotly-plot .gtitle", has_text=f"expert {expert}, layer 3:")
    title.first.wait_for()
    shown = panel.locator("table.mwb-profile-tokens td.mwb-token").evaluate_all(
        "cells => cells.map(c => Number(c.dataset.tokenId))")
    assert shown == top_tokens(folder / "run.zarr", 3, expert)
    panel.locator(".jp-OutputArea-output").first.screenshot(path=str(ARTIFACTS / "6-token-view-profile.png"))


def test_comparison_view_shows_the_agreement_numpy_computes(lab, page):
    url, folder = lab
    page.goto(f"{url}/lab/workspaces/comparison/tree/comparison.ipynb?token={TOKEN}")
    run_all(page)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")  # other notebooks stay open in hidden tabs
    plot = panel.locator(".js-plotly-plot", has=page.locator(".gtitle", has_text="fp32 vs bf16"))
    wait(page, plot.first, "comparison")
    panel.locator(".mwb-comparison span").first.wait_for()
    shown = plot.first.evaluate("gd => gd.data.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}))")
    a, b = (wb.open_store(folder / name).topk_ids.values for name in ("run.zarr", "bf16.zarr"))
    same = (np.sort(a, -1) == np.sort(b, -1)).all(-1).mean(-1)  # [layer]: share of tokens with one expert set
    assert same.min() < 1  # bf16 moves some routing: the pair is a real test
    agreement = shown[0]
    assert [int(x) for x in agreement["x"]] == wb.open_store(folder / "run.zarr").layer.values.tolist()
    np.testing.assert_allclose(agreement["y"], same, atol=1e-9)
    differing = panel.locator(".mwb-comparison span.mwb-diff").count()
    assert differing == int((np.sort(a, -1) != np.sort(b, -1)).any(-1).any(0)[:200].sum())
    panel.locator(".jp-OutputArea-output").first.screenshot(path=str(ARTIFACTS / "7-comparison.png"))


def layer_shares(store: Path) -> np.ndarray:
    """[layer, expert] share of each layer's routing slots, by numpy over the store in blocks of tokens."""
    ds = wb.open_store(store)
    ids, E = ds.topk_ids.transpose("layer", "token", "k"), analysis.expert_count(ds)
    L, T, _ = ids.shape
    counts = np.zeros((L, E), np.int64)
    for s in range(0, T, 1 << 16):
        block = ids[:, s:s + (1 << 16)].values.astype(np.int64)
        counts += np.stack([np.bincount(row[row >= 0], minlength=E) for row in block.reshape(L, -1)])
    return counts / counts.sum(1, keepdims=True)


def bin_means(values: np.ndarray, start: int, stop: int, bins: int = 128) -> np.ndarray:
    """Mean of each of min(bins, stop - start) equal bins of columns [start, stop), as the dashboard bins."""
    n = stop - start
    nb = min(bins, n)
    edges = -(-np.arange(nb + 1) * n // nb)
    part = values[:, start:stop]
    return np.stack([part[:, a:b].mean(1) for a, b in zip(edges[:-1], edges[1:])], 1)


def record_traffic(page) -> tuple[list, list[int]]:
    """Every websocket frame `page` receives from now on, and the status of every HTTP response for plotly's
    bundle (workbench.widgets.figure)."""
    frames, bundle = [], []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(payload)))
    page.on("response", lambda r: bundle.append(r.status) if "/moe-workbench/plotly/" in r.url else None)
    return frames, bundle


def test_v4_scale_dashboard_renders_sorts_and_zooms_in_small_messages(lab, page):
    """A dashboard over a synthetic 1M-token, 61-layer, 384-expert store: the heatmap the browser holds, sorted
    by load and zoomed (a drag, re-binned in the kernel), equals numpy over the store, and no websocket message
    exceeds 2 MB: the figures fetch plotly's bundle from the server extension once instead."""
    from synthetic import synthetic_store

    url, folder = lab
    store = synthetic_store(folder / "v4.zarr")
    nbformat.write(notebook(["from workbench.widgets import RoutingDashboard\n"
                             "RoutingDashboard('v4.zarr', compact=True)"]), folder / "scale.ipynb")
    frames, served = record_traffic(page)
    page.goto(f"{url}/lab/workspaces/scale/tree/scale.ipynb?token={TOKEN}")  # a workspace of its own
    run_all(page)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    heatmap = panel.locator(".js-plotly-plot", has=page.locator(".gtitle", has_text="expert load")).first
    wait(page, heatmap, "v4-dashboard")
    share = layer_shares(store)
    assert share.shape == (61, 384)

    def shown() -> tuple[str, np.ndarray]:
        title, z = heatmap.evaluate("gd => [gd.layout.title.text, gd.data[0].z.map(r => Array.from(r))]")
        return title, np.array(z, dtype=float)

    title, z = shown()
    assert "in 128 bins" in title and z.shape == (61, 128)
    np.testing.assert_allclose(z, bin_means(share, 0, 384), atol=1e-3 * share.max())
    panel.locator(".jp-OutputArea-output").first.screenshot(path=str(ARTIFACTS / "8-v4-scale-dashboard.png"))

    panel.locator(".mwb-sort select").select_option("load")
    panel.locator(".gtitle", has_text="sorted by load").first.wait_for()
    by_load = -np.sort(-share, 1)
    title, z = shown()
    assert z.shape == (61, 128) and (np.diff(z, axis=1) <= 1e-3 * share.max()).all()
    np.testing.assert_allclose(z, bin_means(by_load, 0, 384), atol=1e-3 * share.max())
    panel.locator(".jp-OutputArea-output").first.screenshot(path=str(ARTIFACTS / "9-v4-sorted-by-load.png"))

    # drag across the first tenth of the columns: plotly zooms x, the kernel re-sends single experts
    area = heatmap.locator(".nsewdrag").first.bounding_box()
    y = area["y"] + area["height"] / 2
    page.mouse.move(area["x"] + 2, y)
    page.mouse.down()
    page.mouse.move(area["x"] + area["width"] * 0.1, y + 2, steps=8)
    page.mouse.up()
    wait(page, panel.locator(".gtitle", has_text=" of 384").first, "v4-zoom")
    title, z = shown()
    start, stop = (int(x) for x in re.search(r"positions (\d+)\.\.(\d+) of 384", title).groups())
    stop += 1
    assert "bins" not in title and start <= 2 and 20 < stop < 60 and z.shape == (61, stop - start)
    np.testing.assert_allclose(z, by_load[:, start:stop], atol=1e-3 * share.max())
    panel.locator(".jp-OutputArea-output").first.screenshot(path=str(ARTIFACTS / "10-v4-zoomed.png"))

    sizes = [len(f) for f in frames]
    print(f"websocket frames: {len(sizes)}, largest {max(sizes):,} B; plotly's bundle served over HTTP: {served}")
    assert max(sizes) <= 2 * 1024 * 1024 and served and set(served) == {200}


def test_figures_fall_back_to_the_kernel_for_plotlys_bundle(lab, page):
    """Where the server does not serve plotly's bundle (here: a version it does not have), a figure still
    draws: the kernel sends the bundle in chunks, none over 2 MB."""
    url, folder = lab
    nbformat.write(notebook(["import plotly.graph_objects as go, traitlets\n"
                             "from workbench.widgets.figure import FigureWidget\n\n"
                             "class Unserved(FigureWidget):\n"
                             "    _plotly_bundle = traitlets.Unicode('moe-workbench/plotly/0.0.0/widgetbundle.js')"
                             ".tag(sync=True)\n\n"
                             "Unserved(go.Bar(x=['a', 'b', 'c'], y=[3, 1, 2], name='fallback'))"]),
                   folder / "fallback.ipynb")
    fresh = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})  # plotly not loaded yet
    fresh.set_default_timeout(120_000)
    frames, served = record_traffic(fresh)
    fresh.goto(f"{url}/lab/workspaces/fallback/tree/fallback.ipynb?token={TOKEN}")
    run_all(fresh)
    plot = fresh.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .js-plotly-plot")
    wait(fresh, plot.first, "fallback")
    assert plot.first.evaluate("gd => gd.data.map(t => [t.name, Array.from(t.y)])") == [["fallback", [3, 1, 2]]]
    chunks = [len(f) for f in frames if isinstance(f, bytes) and len(f) > 512 * 1024]
    assert served == [404]
    assert sum(chunks) >= BUNDLE.stat().st_size and max(len(f) for f in frames) <= 2 * 1024 * 1024
    fresh.close()


def test_sidebar_lists_stores_and_opens_a_dashboard(lab, page):
    url, folder = lab
    page.goto(f"{url}/lab?token={TOKEN}")
    page.locator('[data-id="moe-workbench-stores"]').first.click()
    store = page.locator('#moe-workbench-stores[data-state="ready"] li.mwb-store[data-path="run.zarr"]')
    store.wait_for()
    assert "600 tokens" in store.inner_text() and "32 experts" in store.inner_text()
    page.locator("#moe-workbench-stores").screenshot(path=str(ARTIFACTS / "4-sidebar.png"))
    store.locator("button.mwb-open-dashboard").click()
    # a new notebook next to the store, opened and run: its dashboard draws the default selection
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    panel.locator(".js-plotly-plot .gtitle", has_text="co-activation, layer").first.wait_for()
    made = [p.name for p in folder.glob("*.ipynb") if p.name not in ("dashboard.ipynb", "scale.ipynb",
                                                                                "fallback.ipynb", *NOTEBOOKS)]
    assert len(made) == 1 and "RoutingDashboard" in (folder / made[0]).read_text()
    page.screenshot(path=str(ARTIFACTS / "5-dashboard-from-sidebar.png"))
