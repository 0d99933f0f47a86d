"""Notebook display of routing Datasets: the MIME payload the JupyterLab renderer draws, and its fallbacks."""

import base64
import io
import json

import numpy as np
import pytest
import torch
import xarray as xr
from IPython.core.interactiveshell import InteractiveShell
from PIL import Image

import workbench as wb
from workbench import analysis, display
from workbench.demo import EMBEDDED_MODEL
from test_analysis import dataset, routing


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    ids = torch.tensor([list(b"def main():\n    return sum(range(42))\n")])
    logits, cache = model.run_with_cache(ids, names=["layers.*.router.*"])
    path = wb.trace(model, ids[0], tmp_path_factory.mktemp("display") / "run.zarr", progress=False)
    torch.set_num_threads(threads)
    return analysis.from_cache(cache, ids, logits=logits), wb.open_store(path), path


def test_a_trace_shows_its_load_heatmap(traced):
    ds, _, _ = traced
    bundle = display.routing_bundle(ds)
    summary = bundle[display.MIME]
    assert summary["version"] == 1 and summary["kind"] == "trace"
    fields = dict(summary["fields"])
    assert fields["tokens"] == f"{ds.sizes['token']}" and fields["experts"] == "32 routed, top-4"
    assert fields["layers"] == "0-5"
    hm = summary["heatmap"]
    assert hm["layers"] == list(range(6)) and hm["experts"] == list(range(32)) and hm["baseline"] == 1 / 32
    ids = ds.topk_ids.values
    brute = np.stack([np.bincount(ids[i].ravel(), minlength=32) / ids[i].size for i in range(6)])
    np.testing.assert_allclose(np.array(hm["values"]), brute, atol=1e-6)
    json.dumps(summary)  # plain JSON, as the front end receives it


def test_a_store_shows_its_provenance(traced):
    _, store, path = traced
    summary = display.routing_summary(store)
    fields = dict(summary["fields"])
    assert summary["kind"] == "store" and summary["title"] == "routing store"
    assert fields["model"] == str(EMBEDDED_MODEL) and fields["tokens"].endswith("complete")
    assert fields["backend"] == store.attrs["backend"] and fields["workbench"] == wb.__version__
    assert np.array(summary["heatmap"]["values"]).shape == (6, 32)


def test_an_analysis_result_shows_its_layer_by_expert_variable(traced):
    _, store, _ = traced
    load = analysis.expert_load(store)
    summary = display.routing_summary(load)
    assert summary["kind"] == "analysis" and summary["title"] == "expert load"
    np.testing.assert_allclose(np.array(summary["heatmap"]["values"]), load.share.values, atol=1e-6)
    co = display.routing_summary(analysis.coactivation(store))
    assert co["heatmap"] is None and dict(co["fields"])["mode"] == "all_pairs"
    assert "coactivation" in dict(co["fields"])


def test_fallbacks_render_without_the_extension(traced):
    ds, _, _ = traced
    bundle = display.routing_bundle(ds)
    png = base64.b64decode(bundle["image/png"])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width <= display.PNG_WIDTH and image.height > 6 * 2
    page = bundle["text/html"]
    assert page.count("<tr>") == len(bundle[display.MIME]["fields"]) and "data:image/png;base64," in page
    assert "<details><summary>xarray</summary>" in page


def test_ipython_displays_workbench_datasets_only(traced):
    ds, _, _ = traced
    shell = InteractiveShell.instance()
    assert display.register(shell)
    data, _ = shell.display_formatter.format(ds)
    assert display.MIME in data and "image/png" in data and "text/plain" in data
    data, _ = shell.display_formatter.format(xr.Dataset({"x": ("t", np.arange(3))}))
    assert display.MIME not in data and "text/html" in data  # xarray's own view


def test_a_large_store_is_summarised_without_a_scan(traced, monkeypatch):
    _, store, _ = traced
    monkeypatch.setattr(display, "MAX_SCAN_ENTRIES", 10)
    summary = display.routing_summary(store)
    assert summary["heatmap"] is None and "expert_load" in dict(summary["fields"])["load"]
    assert display.routing_bundle(store).keys() == {display.MIME, "text/html"}


def test_the_payload_of_a_large_model_stays_small():
    ids = routing(64, 61, 384, 8, seed=0)  # V4-Pro's 61 MoE layers of 384 experts
    summary = display.routing_summary(dataset(ids, 384))
    assert len(json.dumps(summary)) < 2 * 2**20
    assert np.array(summary["heatmap"]["values"]).shape == (61, 384)


def test_other_objects_are_not_claimed():
    assert display.routing_bundle(xr.Dataset()) is None and display.routing_bundle([1, 2]) is None
    with pytest.raises(ValueError, match="not a workbench routing Dataset"):
        display.routing_summary(xr.Dataset())
