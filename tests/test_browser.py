"""End to end in a real browser: headless Chromium (Debian's, driven by Playwright) against a real `jupyter lab`
on localhost, started by `make lab`, with the installed extension. A saved routing display renders with no
kernel; the dashboard runs in a kernel, and a click on its load heatmap updates the linked views. Screenshots
land in ARTIFACTS."""

import os
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

import workbench as wb
from test_install import make_lab
from workbench.demo import EMBEDDED_MODEL

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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A folder with a traced store and a notebook whose first output is saved, served by `make lab`."""
    folder = tmp_path_factory.mktemp("lab")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    text = (ROOT / "data" / "corpus" / "prose.heldout.txt").read_bytes()[:600]
    wb.trace(model, np.frombuffer(text, np.uint8).astype(np.int64), folder / "run.zarr", progress=False)
    torch.set_num_threads(threads)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK[0])],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    nb.cells.append(nbformat.v4.new_code_cell(NOTEBOOK[1]))
    nbformat.write(nb, folder / "dashboard.ipynb")
    news = folder / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about Jupyter news?" box over the figures
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

    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
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
    made = [p.name for p in folder.glob("*.ipynb") if p.name != "dashboard.ipynb"]
    assert len(made) == 1 and "RoutingDashboard" in (folder / made[0]).read_text()
    page.screenshot(path=str(ARTIFACTS / "5-dashboard-from-sidebar.png"))
