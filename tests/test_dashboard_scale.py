"""The routing dashboard at DeepSeek-V4 scale: sorting (id, load, co-activation similarity), columns binned and
re-binned on the server as the x axis zooms, the search box, all against numpy on small traces; and on a
synthetic 1M-token, 61-layer, 384-expert store, every message the widgets send stays under 2 MB."""

import json
import time

import comm
import numpy as np
import pytest
from comm.base_comm import BaseComm
from plotly.callbacks import InputDeviceState, Points

import workbench as wb
from synthetic import HASH_LAYERS, synthetic_store
from test_analysis import dataset, routing
from workbench import widgets as W
from workbench.widgets.dashboard import MAX_COLUMNS, runs_text

MB = 1 << 20


def click(fig, x, y) -> None:
    fig.data[0]._dispatch_on_click(Points(point_inds=[0], xs=[x], ys=[y], trace_index=0), InputDeviceState())


def zoom(fig, x0: float, x1: float) -> None:
    """What a zoom or pan of the x axis in the browser sends: a relayout of xaxis.range."""
    fig.plotly_relayout({"xaxis.range": [x0, x1]})


def bins(matrix: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(mean [rows, nb], argmax column [rows, nb], bin edges) of the columns of `matrix` in `nb` bins, column c
    in bin c * nb // n."""
    n = matrix.shape[1]
    b = np.arange(n) * nb // n
    mean = np.stack([matrix[:, b == i].mean(1) for i in range(nb)], 1)
    first = [int(np.flatnonzero(b == i)[0]) for i in range(nb)]
    top = np.stack([matrix[:, b == i].argmax(1) + first[i] for i in range(nb)], 1)
    return mean, top, first + [n]


def close(z, want) -> None:
    """`z` as the figure holds it (compact_matrix: 1/1000 of the largest value or finer) equals `want`."""
    np.testing.assert_allclose(np.array(z, float), want, rtol=0, atol=1e-3 * np.abs(want).max())


@pytest.fixture(scope="module")
def wide():
    """(ds, ids, counts[layer, expert]): 400 tokens, 3 layers, 300 experts (more than MAX_COLUMNS), top-4."""
    ids = routing(400, 3, 300, 4, seed=3, skew=2.0)
    counts = np.stack([np.bincount(layer.ravel(), minlength=300) for layer in ids])
    return dataset(ids, 300, chunk=64), ids, counts


def test_binned_columns_and_zoom_match_numpy(wide):
    ds, ids, counts = wide
    dash = W.RoutingDashboard(ds, sort="load")
    order = np.argsort(-counts, axis=1, kind="stable")
    assert (dash.order == order).all()
    rows = np.arange(3)[:, None]
    drawn = counts[rows, order] / (400 * 4)
    mean, top, edges = bins(drawn, MAX_COLUMNS)
    heat = dash.heatmap.data[0]
    assert np.shape(heat.z) == (3, MAX_COLUMNS) and list(heat.x) == [e - 0.5 for e in edges]
    close(heat.z, mean)
    custom = np.array(heat.customdata)
    busiest = order[rows, top]
    assert (custom[..., 0] == busiest).all()  # the hover and a click name the bin's busiest expert
    assert (custom[..., 3] == edges[:-1]).all() and (custom[..., 4] == np.array(edges[1:]) - 1).all()
    np.testing.assert_allclose(custom[..., 2], drawn[rows, top], atol=1e-5)
    assert "in 128 bins" in dash.heatmap.layout.title.text
    click(dash.heatmap, (edges[40] + edges[41] - 1) / 2, 11)  # the middle of bin 40 at layer 11
    assert dash.selected == (11, int(busiest[1, 40]))
    click(dash.heatmap, edges[41] - 0.5 - 1e-9, 12)  # its right edge is still bin 40
    assert dash.selected == (12, int(busiest[2, 40]))

    zoom(dash.heatmap, 9.6, 49.4)  # columns 10..49: single experts
    assert dash.range == (10, 50) and tuple(dash.heatmap.layout.xaxis.range) == (9.5, 49.5)
    heat = dash.heatmap.data[0]
    close(heat.z, drawn[:, 10:50])
    assert (np.array(heat.customdata)[..., 0] == order[:, 10:50]).all() and list(heat.x) == [c - 0.5 for c in
                                                                                           range(10, 51)]
    assert "positions 10..49 of 300" in dash.heatmap.layout.title.text and "bins" not in dash.heatmap.layout.title.text
    click(dash.heatmap, 20, 10)
    assert dash.selected == (10, int(order[0, 20]))
    zoom(dash.heatmap, 99.5, 299.5)  # 200 columns: binned again, over the visible range only
    mean, top, edges = bins(drawn[:, 100:], MAX_COLUMNS)
    close(dash.heatmap.data[0].z, mean)
    assert (np.array(dash.heatmap.data[0].customdata)[..., 0] == order[:, 100:][rows, top]).all()
    dash.heatmap.plotly_relayout({"xaxis.autorange": True})  # a double click: everything again
    assert dash.range == (0, 300) and np.shape(dash.heatmap.data[0].z) == (3, MAX_COLUMNS)
    dash.sort_picker.value = "id"  # the dropdown re-sorts live and shows every column
    assert dash.sort == "id" and (np.array(dash.heatmap.data[0].customdata)[..., 0] ==
                                  bins(counts / 1600, MAX_COLUMNS)[1]).all()  # columns are expert ids
    with pytest.raises(ValueError, match="stop must be"):
        dash.view(10, 10)


def cosine_rows(ids: np.ndarray, E: int) -> np.ndarray:
    """[E, E] cosine similarity of the co-activation rows (N(i) on the diagonal) of one layer's ids [T, k]."""
    hot = np.zeros((len(ids), E))
    np.put_along_axis(hot, ids.astype(np.int64), 1, 1)
    n = hot.T @ hot  # N(i, j), with N(i) on the diagonal
    unit = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)
    return unit @ unit.T


def test_similarity_order_chains_experts_with_similar_coactivation(tmp_path):
    path = synthetic_store(tmp_path / "small.zarr", tokens=20_000, layers=5, experts=48, k=6, seed=1)
    ids = wb.open_store(path).topk_ids.values
    dash = W.RoutingDashboard(path, sort="similarity", compact=True)
    assert "hash-routed</b> 0..2" in dash.header.value and "<b>layers</b> 0..4" in dash.header.value
    order = dash.order
    assert (np.sort(order, 1) == np.arange(48)).all()
    for layer in range(5):
        sim = cosine_rows(ids[layer], 48)
        counts = np.bincount(ids[layer].ravel(), minlength=48)
        assert order[layer, 0] == counts.argmax()
        for j in range(47):  # each next: the most similar of the experts not yet placed
            rest = np.setdiff1d(np.arange(48), order[layer, :j + 1])
            assert sim[order[layer, j], order[layer, j + 1]] == pytest.approx(sim[order[layer, j], rest].max(),
                                                                             abs=1e-9)
        if layer >= HASH_LAYERS:  # teams of k - 2 experts: neighbours are far more alike than in id order
            along = sim[order[layer, :-1], order[layer, 1:]].mean()
            assert along > 2 * sim[np.arange(47), np.arange(1, 48)].mean()
    custom = np.array(dash.heatmap.data[0].customdata)
    assert (custom[..., 0] == order).all()  # x is the position in the order; the hover names the expert
    assert dash.heatmap.layout.xaxis.title.text == "position in the layer's similarity order"


def test_compact_mode_labels_every_few_layers(tmp_path):
    path = synthetic_store(tmp_path / "tall.zarr", tokens=2048, layers=61, experts=16, k=4)
    dash = W.RoutingDashboard(path, compact=True)
    assert list(dash.heatmap.layout.yaxis.tickvals) == list(range(0, 61, 4))
    assert dash.heatmap.layout.height == 120 + 8 * 61
    assert list(W.RoutingDashboard(path).heatmap.layout.yaxis.tickvals) == list(range(61))
    assert runs_text([0, 1, 2, 3, 7, 9, 10]) == "0..3, 7, 9, 10"


@pytest.fixture(scope="module")
def lettered():
    """(ds, ids, inputs): 300 tokens of the letters a..h, 3 layers (10, 11, 12), 8 experts, top-2."""
    ids = routing(300, 3, 8, 2, seed=4, skew=1.0)
    inputs = np.random.default_rng(2).integers(97, 105, 300)
    return dataset(ids, 8, tokens=inputs), ids, inputs


def test_search_selects_what_it_names(lettered):
    ds, ids, inputs = lettered
    dash = W.RoutingDashboard(ds)
    assert dash.search("layer 11") .startswith("layer 11: its busiest expert")
    assert dash.selected == (11, int(np.bincount(ids[1].ravel(), minlength=8).argmax()))
    assert dash.search("12/5") == "layer 12, expert 5" and dash.selected == (12, 5)
    assert dash.search("L10 expert 3") == "layer 10, expert 3" and dash.selected == (10, 3)
    assert dash.search("Layer 11 E6") == "layer 11, expert 6" and dash.selected == (11, 6)
    assert dash.search("expert 2") == "layer 11, expert 2" and dash.selected == (11, 2)  # at the selected layer
    taken = np.bincount(ids[1][inputs == ord("c")].ravel(), minlength=8)
    found = dash.search("c")
    best = np.argsort(-taken, kind="stable")[:3]
    assert dash.selected == (11, int(best[0]))
    assert found == (f"token 'c' (id 99, {(inputs == 99).sum()} times): at layer 11 taken most by expert "
                     + ", ".join(f"{e} ({taken[e]})" for e in best))
    for query, message in (("layer 99", "layer 99 is not a routed layer (routed: 10..12)"),
                           ("expert 8", "expert 8 does not exist: experts are 0..7"),
                           ("zz", "no token of the 300 reads 'zz'")):
        assert dash.search(query).startswith(message) and dash.selected == (11, int(best[0]))
    dash.search_box.value = "layer 99"  # the box: the message on the result line, nothing raised
    assert "not a routed layer" in dash.search_result.value
    dash.search_box.value = "12/5"
    assert dash.search_result.value == "layer 12, expert 5" and dash.selected == (12, 5)
    assert dash.sort_picker.description == "sort" and "mwb-sort" in dash.sort_picker._dom_classes
    assert dash.search_box.description == "search" and "mwb-search" in dash.search_box._dom_classes


# ---------------------------------------------------------------- DeepSeek-V4 scale


@pytest.fixture(scope="module")
def synthetic_v4(tmp_path_factory):
    """The synthetic 1M-token, 61-layer, 384-expert, top-6 store (tests/synthetic.py), built once per module."""
    return synthetic_store(tmp_path_factory.mktemp("v4") / "v4.zarr")


class Recorder(BaseComm):
    """A comm that records the size of every message a widget sends: JSON text plus binary buffers, the opening
    message's state (a figure's `_esm` included) too."""

    sizes: list[int] = []

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        Recorder.sizes.append(len(json.dumps(data, allow_nan=False)) + sum(memoryview(b).nbytes for b in
                                                                           buffers or ()))


def layer_counts(path, L: int, E: int) -> np.ndarray:
    """[layer, expert] routing counts of a store, read chunk by chunk with zarr and counted with numpy."""
    import zarr

    z = zarr.open_group(path, mode="r")["topk_ids"]
    counts = np.zeros(L * E, np.int64)
    for s in range(0, z.shape[1], 1 << 16):
        block = z[:, s:s + (1 << 16)].astype(np.int64)
        counts += np.bincount((block + np.arange(L)[:, None, None] * E).ravel(), minlength=L * E)
    return counts.reshape(L, E)


def test_dashboard_at_deepseek_v4_scale_sends_small_messages(synthetic_v4, monkeypatch):
    monkeypatch.setattr(comm, "create_comm", Recorder)
    Recorder.sizes = []
    t0 = time.perf_counter()
    dash = W.RoutingDashboard(synthetic_v4, compact=True)
    built = time.perf_counter() - t0
    assert dash.heatmap.comm is not None and Recorder.sizes  # the messages were recorded
    assert (len(dash.layers), dash.n_experts, dash.k) == (61, 384, 6) and dash.selected[0] == HASH_LAYERS
    counts = layer_counts(synthetic_v4, 61, 384)
    share = counts / counts.sum(1, keepdims=True)
    mean, top, edges = bins(share, MAX_COLUMNS)
    close(dash.heatmap.data[0].z, mean)
    steps = {"construct": max(Recorder.sizes)}
    for sort in ("load", "similarity"):
        Recorder.sizes = []
        dash.sort_picker.value = sort
        steps[sort] = max(Recorder.sizes)
    assert (dash._order("load") == np.argsort(-counts, axis=1, kind="stable")).all()
    Recorder.sizes = []
    zoom(dash.heatmap, 99.5, 159.5)  # 60 columns of the similarity order: single experts
    steps["zoom"] = max(Recorder.sizes)
    rows = np.arange(61)[:, None]
    close(dash.heatmap.data[0].z, share[rows, dash.order[:, 100:160]])
    click(dash.heatmap, 130, 40)
    assert dash.selected == (40, int(dash.order[40, 130]))
    Recorder.sizes = []
    t1 = time.perf_counter()
    found = dash.search("e")
    searched = time.perf_counter() - t1
    steps["search"] = max(Recorder.sizes)
    import zarr

    root = zarr.open_group(synthetic_v4, mode="r")
    hit = root["input_ids"][:] == ord("e")
    taken = np.bincount(root["topk_ids"][40][hit].ravel(), minlength=384)
    assert found.startswith(f"token 'e' (id 101, {hit.sum():,} times): at layer 40 taken most by expert "
                            f"{taken.argmax()} ({taken.max():,})")
    assert dash.selected == (40, int(taken.argmax()))
    print(f"\nconstruct {built:.1f} s, search {searched:.1f} s; largest message per step (bytes): {steps}")
    assert max(steps.values()) < 2 * MB
    assert built < 60
