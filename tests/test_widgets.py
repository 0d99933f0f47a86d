"""Notebook widgets (workbench.widgets): what each figure and HTML view holds against brute-force counts on small
random traces and a store of the embedded model, the links between figures (clicks, zoom), the message size
sent to the browser for a 1M-token, 384-expert store, and the intervention panel against manual hooked
forwards of the embedded model."""

import html
import json
import re
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import ipywidgets
import numpy as np
import plotly
import plotly.graph_objects as go
import pytest
import torch
import xarray as xr
from plotly.callbacks import InputDeviceState, Points

import workbench as wb
from test_analysis import dataset, routing
from workbench import analysis as A
from workbench import colours
from workbench import widgets as W
from workbench.interventions import ablate, force, steer

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


def payload(widget) -> int:
    """Bytes a widget sends to the front end: the JSON of each figure, the text of each HTML widget, over its
    whole tree of children. Each figure must also be strict JSON (no NaN in its lists: the widget sends 2-D
    arrays as JSON lists, and Jupyter rejects NaN there)."""
    if isinstance(widget, go.FigureWidget):
        json.dumps(widget.to_plotly_json(), allow_nan=False)
        return len(json.dumps(widget.to_plotly_json(), cls=plotly.utils.PlotlyJSONEncoder))
    if isinstance(widget, (ipywidgets.HTML, W.common.ClickableHTML)):
        return len(widget.value)
    return sum(payload(child) for child in getattr(widget, "children", ()))


def click(fig: go.FigureWidget, x, y) -> None:
    """What a click on the cell (x, y) of the figure's first trace does in the browser."""
    fig.data[0]._dispatch_on_click(Points(point_inds=[0], xs=[x], ys=[y], trace_index=0), InputDeviceState())


def shown_byte(b: int) -> str:
    """How the token view writes a byte-level token."""
    return chr(b) if 32 <= b < 127 else {9: "\\t", 10: "\\n", 13: "\\r"}.get(int(b), f"\\x{b:02x}")


def spans(view: W.TokenView) -> list[tuple[str, str, str]]:
    """(style, title, text) of every token span the view shows."""
    return re.findall(r'<span class="mwb-token" data-pos="\d+" style="([^"]*)" title="([^"]*)">([^<]*)</span>',
                      view.html())


# ---------------------------------------------------------------- random traces


@pytest.fixture(scope="module")
def trace():
    """(ds, ids, domains): 203 tokens, 3 layers, 8 experts, top-2, one dead expert, in chunks of 7 tokens."""
    ids = routing(203, 3, 8, 2, seed=0, dead=(7,), skew=1.0)
    domains = np.array(["code", "prose", "math"])[np.random.default_rng(5).integers(0, 3, 203)]
    return dataset(ids, 8, chunk=7), ids, domains


def test_dashboard_matches_brute_force(trace):
    ds, ids, domains = trace
    L, T, k = ids.shape
    dash = W.RoutingDashboard(ds, labels=domains)
    counts = np.array([[Counter(layer.ravel().tolist())[e] for e in range(8)] for layer in ids])
    share = counts / (T * k)
    np.testing.assert_allclose(dash.heatmap.data[0].z, share, atol=1e-3 * share.max())
    custom = np.array(dash.heatmap.data[0].customdata)
    assert (custom[..., 0] == np.arange(8)).all()  # sort="id": column j is expert j in every layer
    np.testing.assert_allclose(custom[..., 1], counts / (T * k / 8), atol=0.005)
    heat = dash.heatmap.data[0]
    assert (heat.zmin, heat.zmid, heat.zmax) == (0, 1 / 8, 2 / 8)  # diverging, white at the uniform share 1/E
    assert heat.colorscale[0][1] == "rgb(33,102,172)" and heat.colorscale[-1][1] == "rgb(178,24,43)"
    assert list(dash.heatmap.data[0].y) == [10, 11, 12] and dash.heatmap.layout.title.text == "expert load"
    assert dash.selected == (10, int(counts[0].argmax()))  # no hash-routed layer: the first, its busiest expert
    dash.select(12, 3)
    assert dash.selected == (12, 3)
    want = A.coactivation(ds).coactivation.sel(layer=12).values
    assert np.isnan(want[7]).all()  # the dead expert's row: NaN, sent as null
    np.testing.assert_allclose(np.array(dash.coactivation.data[0].z, float), want, atol=1e-3 * np.nanmax(want),
                               equal_nan=True)
    assert payload(dash) < 100_000
    assert dash.coactivation.layout.title.text == "co-activation, layer 12"
    row, col = dash.coactivation.layout.shapes
    assert (row.y0, row.y1, col.x0, col.x1) == (2.5, 3.5, 2.5, 3.5)
    # the profile: expert 3 at layer 12 only, against numpy
    fig = dash.profile_figure
    hit = (ids[2] == 3).any(1)
    assert fig.layout.title.text.startswith(f"expert 3, layer 12: takes {hit.sum()} of 203 tokens")
    tokens, by_domain, position, partners = fig.data
    inputs = ds.input_ids.values
    taken = Counter(inputs[hit].tolist())
    top = sorted(taken, key=lambda t: (-taken[t], t))[:10]
    assert list(tokens.y) == [f"{shown_byte(t)} ({t})" for t in top] and list(tokens.x) == [taken[t] for t in top]
    names = sorted(set(domains))
    assert list(by_domain.x) == names
    shares = [np.mean([3 in row for row in ids[2, domains == d].tolist()]) for d in names]
    np.testing.assert_allclose(by_domain.y, shares, rtol=1e-12)
    assert fig.layout.shapes[0].y0 == pytest.approx(k / 8)  # the uniform k/E line of the domain panel
    b = np.arange(T) * 20 // T
    np.testing.assert_allclose(position.y, [(ids[2, b == i] == 3).sum() / ((b == i).sum() * k) for i in range(20)])
    pair = {j: int((hit & (ids[2] == j).any(1)).sum()) for j in range(8) if j != 3}
    best = sorted((j for j in pair if pair[j]), key=lambda j: (-pair[j], j))
    assert list(partners.x) == [str(j) for j in best]
    np.testing.assert_allclose(partners.y, [pair[j] / hit.sum() for j in best])
    assert "<b>tokens</b> 203" in dash.header.value and "<b>k</b> 2" in dash.header.value
    assert repr(dash).startswith("RoutingDashboard(") and "selected=(layer 12, expert 3), by domain" in repr(dash)


def test_dashboard_click_opens_the_expert_profile_at_that_layer(trace):
    ds, ids, domains = trace
    dash = W.RoutingDashboard(ds, labels=domains, layer=12, expert=0)
    before = np.array(dash.coactivation.data[0].z, float)
    click(dash.heatmap, 5, 11)
    assert dash.selected == (11, 5)
    assert dash.coactivation.layout.title.text == "co-activation, layer 11"
    assert dash.profile_figure.layout.title.text.startswith("expert 5, layer 11:")
    assert dash.profile.attrs["count"] == (ids[1] == 5).any(1).sum()
    assert not np.allclose(np.array(dash.coactivation.data[0].z, float), before, equal_nan=True)
    click(dash.coactivation, 2, 5)  # a co-activation cell selects its partner expert at the same layer
    assert dash.selected == (11, 2)
    partner = dash.profile_figure.data[3].x[0]
    dash.profile_figure.data[3]._dispatch_on_click(Points(point_inds=[0], xs=[partner], ys=[0], trace_index=3),
                                                   InputDeviceState())
    assert dash.selected == (11, int(partner))


def test_dashboard_sorts_experts_by_load_and_compacts_layers(trace):
    ds, ids, _ = trace
    dash = W.RoutingDashboard(ds, sort="load", compact=True)
    counts = np.array([[(layer == e).sum() for e in range(8)] for layer in ids])
    order = np.argsort(-counts, axis=1, kind="stable")
    custom = np.array(dash.heatmap.data[0].customdata)
    assert (custom[..., 0] == order).all()
    z = np.array(dash.heatmap.data[0].z, float)
    assert (np.diff(z, axis=1) <= 0).all()  # each row falls from its busiest expert
    click(dash.heatmap, 0, 12)  # rank 0 of layer 12: its busiest expert
    assert dash.selected == (12, int(order[2, 0]))
    click(dash.heatmap, 7, 10)
    assert dash.selected == (10, int(order[0, 7]))
    assert dash.heatmap.layout.height < W.RoutingDashboard(ds).heatmap.layout.height
    with pytest.raises(ValueError, match="sort must be one of"):
        W.RoutingDashboard(ds, sort="size")


@pytest.mark.parametrize("layer, expert, message", [(13, 0, r"layer .*\[10, 11, 12\]"), (10, 8, "expert .* 0 and 7"),
                                                    (10, -1, "expert"), ("10", 0, "layer"), (10, 1.5, "expert")])
def test_dashboard_select_rejects_bad_arguments(trace, layer, expert, message):
    dash = W.RoutingDashboard(trace[0])
    with pytest.raises(ValueError, match=message):
        dash.select(layer, expert)
    assert dash.selected == (10, dash.selected[1])  # unchanged


def test_sources_must_hold_routing(trace, tmp_path):
    with pytest.raises(ValueError, match="source must be a store path or an xarray Dataset"):
        W.TokenView(trace[1])
    with pytest.raises(ValueError, match="no topk_ids"):
        W.LongContextNavigator(trace[0].drop_vars("topk_ids"))
    with pytest.raises(ValueError, match="no store"):
        W.RoutingDashboard(tmp_path / "missing.zarr")


def test_token_view_colours_tokens_by_first_choice(trace):
    ds, ids, _ = trace
    weights = np.random.default_rng(2).random(ids.shape).astype(np.float16)
    view = W.TokenView(ds.assign(topk_weights=(("layer", "token", "k"), weights)), layer=11, start=20, length=30)
    shown = spans(view)
    assert len(shown) == 30
    tokens = ds.input_ids.values
    for j, (style, title, text) in enumerate(shown):
        t = 20 + j
        assert style == f"background:{W.PALETTE[ids[1, t, 0]]}"
        assert title.startswith(f"token {t}: ")
        assert f"| experts {ids[1, t, 0]}, {ids[1, t, 1]} | weights {weights[1, t, 0]:.2f}, " in title
        assert text == html.escape(shown_byte(tokens[t]))
    legend = dict(re.findall(r"expert (\d+): (\d+)", view.legend.value))
    assert legend == {str(e): str(c) for e, c in Counter(ids[1, 20:50, 0].tolist()).items()}
    win = view.window()
    assert win.topk_ids.dims == ("token", "k") and win.token.values.tolist() == list(range(20, 50))
    view.next_button.click()
    assert view.start == 50 and spans(view)[0][1].startswith("token 50: ")
    view.layer_picker.value = 12
    assert spans(view)[0][0] == f"background:{W.PALETTE[ids[2, 50, 0]]}"
    assert repr(view).startswith("TokenView(") and "layer=12" in repr(view)


def test_token_view_click_opens_the_first_choice_experts_profile(trace):
    ds, ids, _ = trace
    view = W.TokenView(ds, layer=11, start=20, length=30)
    assert view.profile is None and re.findall(r'data-pos="(\d+)"', view.html()) == [str(t) for t in range(20, 50)]
    view.text.clicked = 25  # what a click on the token at position 25 sends
    assert view.text.clicked == -1  # handled and reset, so the same token can be clicked again
    profile = view.profile
    assert profile in view.children and profile.selected == (11, int(ids[1, 25, 0]))
    taken = np.bincount(ds.input_ids.values[(ids[1] == ids[1, 25, 0]).any(-1)], minlength=256)
    assert profile.profile.frequent_count.values[0] == taken.max()
    view.layer_picker.value = 12
    view.text.clicked = 31
    assert view.profile is profile and profile.selected == (12, int(ids[2, 31, 0]))
    with pytest.raises(ValueError, match="position"):
        view.open_profile(10_000)


def test_token_view_clamps_the_window_and_checks_arguments(trace):
    ds = trace[0]
    view = W.TokenView(ds, start=190, length=200)
    assert len(spans(view)) == 13 and "weights" not in view.html()  # no topk_weights in this trace
    view.prev_button.click()
    assert view.start == 0 and len(spans(view)) == 200
    for kwargs, name in [({"start": 203}, "start"), ({"length": 0}, "length"), ({"length": 5000}, "length"),
                         ({"layer": 3}, "layer")]:
        with pytest.raises(ValueError, match=name):
            W.TokenView(ds, **kwargs)


def brute_bins(ids: np.ndarray, E: int, start: int, stop: int, bins: int) -> tuple[np.ndarray, list[int]]:
    """[bin, expert] share of the slots of positions [start, stop) of one layer's ids [T, k], position p in bin
    floor((p - start) * bins / (stop - start)), and each bin's first position."""
    n = stop - start
    counts = [Counter() for _ in range(bins)]
    first: dict[int, int] = {}
    for p in range(start, stop):
        b = (p - start) * bins // n
        first.setdefault(b, p)
        counts[b].update(e for e in ids[p].tolist() if e >= 0)
    share = np.array([[c[e] / max(sum(c.values()), 1) for e in range(E)] for c in counts])
    return share, [first[b] for b in range(bins)]


def test_navigator_aggregates_as_brute_force(trace, monkeypatch):
    ds, ids, _ = trace
    ids = ids.copy()
    ids[1, 50:60, 1] = -1  # slots without routing are not counted
    ds = ds.assign(topk_ids=(("layer", "token", "k"), ids)).chunk({"token": 7})
    monkeypatch.setattr(W.navigator, "BLOCK_ENTRIES", 22)  # blocks of 11 tokens, not aligned with the bins or chunks
    nav = W.LongContextNavigator(ds, layer=11, bins=10, experts=3)
    got = nav.aggregate(0, 203)
    share, first = brute_bins(ids[1], 8, 0, 203, 10)
    np.testing.assert_allclose(got.values, share, rtol=1e-12)
    assert got.dims == ("bin", "expert") and got.bin_start.values.tolist() == first
    assert got.bin_stop.values.tolist() == first[1:] + [203]
    np.testing.assert_allclose(nav.figure.data[0].z, share.T, atol=1e-3 * share.max())
    top = np.argsort(-share.sum(0), kind="stable")[:3]
    assert [line.name for line in nav.figure.data[1:]] == [f"expert {e}" for e in top]
    small = nav.aggregate(17, 23)  # fewer tokens than bins: one bin per token
    assert small.bin_start.values.tolist() == list(range(17, 23))
    np.testing.assert_allclose(small.values, brute_bins(ids[1], 8, 17, 23, 6)[0])


def test_navigator_colours_load_around_uniform_and_opens_profiles(trace):
    ds, ids, _ = trace
    nav = W.LongContextNavigator(ds, layer=12, bins=10, experts=2)
    heat = nav.figure.data[0]
    assert (heat.zmin, heat.zmid, heat.zmax) == (0.0, 1 / 8, 2 / 8)  # white at the uniform share 1/E
    assert [c[1] for c in heat.colorscale] == [c for _, c in colours.DIVERGING]
    click(nav.figure, 30, 5)  # the heatmap's row of expert 5
    assert nav.profile in nav.children and nav.profile.selected == (12, 5)
    count = (ids[2] == 5).any(-1).sum()
    assert nav.profile.profile.attrs["count"] == count
    nav.layer_picker.value = 11
    click(nav.figure, 30, 3)
    assert nav.profile.selected == (11, 3)


def test_navigator_zoom_reaggregates_the_visible_range(trace):
    ds, ids, _ = trace
    nav = W.LongContextNavigator(ds, layer=12, bins=10, experts=2)
    nav.view(40, 150)
    share, first = brute_bins(ids[2], 8, 40, 150, 10)
    heat = nav.figure.data[0]
    assert list(heat.x) == first + [150]  # bin edges
    np.testing.assert_allclose(heat.z, share.T, atol=1e-3 * share.max())
    assert all(len(line.x) == len(line.y) == 10 for line in nav.figure.data[1:])
    assert nav.range == (40, 150) and "tokens 40..150" in nav.figure.layout.title.text
    nav.figure.plotly_relayout({"xaxis2.range[0]": 60.4, "xaxis2.range[1]": 99.2})  # a zoom in the browser
    assert nav.range == (60, 100) and list(nav.figure.data[0].x)[:2] == [60, 64]
    nav.figure.plotly_relayout({"xaxis.autorange": True})  # double click
    assert nav.range == (0, 203)
    nav.view(5, 9)
    nav.reset_button.click()
    assert nav.range == (0, 203) and len(nav.figure.data[0].x) == 11
    for start, stop in [(-1, 10), (10, 10), (0, 204), (3.5, 10)]:
        with pytest.raises(ValueError, match="start|stop"):
            nav.view(start, stop)
    with pytest.raises(ValueError, match="bins"):
        W.LongContextNavigator(ds, bins=0)


# ---------------------------------------------------------------- a store of the embedded model


@pytest.fixture(scope="module")
def model(embedded):
    return embedded


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    """A store of 300 bytes of held-out code, and those bytes."""
    text = (ROOT / "data" / "corpus" / "code.heldout.txt").read_bytes()[:300]
    tokens = np.frombuffer(text, np.uint8).astype(np.int64)
    out = wb.trace(model, tokens, tmp_path_factory.mktemp("widgets") / "run.zarr", chunk_tokens=128, progress=False)
    return out, text


def test_widgets_open_a_store_path(store):
    path, text = store
    ds = wb.open_store(path)
    ids = ds.topk_ids.values
    dash = W.RoutingDashboard(path)
    assert dash.selected[0] == 2  # layers 0 and 1 are hash-routed
    assert "hash-routed</b> 0, 1" in dash.header.value and str(path) in dash.header.value
    layer, expert = dash.selected
    hit = (ids[layer] == expert).any(1)
    taken = Counter(np.frombuffer(text, np.uint8)[hit].tolist())
    top = sorted(taken, key=lambda t: (-taken[t], t))[:10]
    assert list(dash.profile_figure.data[0].y) == [f"{shown_byte(t)} ({t})" for t in top]
    weights = np.where(ids[layer] == expert, ds.topk_weights.values[layer].astype(np.float64), 0).sum(1)
    strong = sorted(np.flatnonzero(hit), key=lambda p: (-weights[p], p))[:10]
    assert list(dash.profile_figure.data[1].x) == [str(p) for p in strong]  # no labels: the highest weights
    assert dash.profile_figure.layout.title.text.startswith(f"expert {expert}, layer {layer}")
    view = W.TokenView(path, layer=4, start=250)
    shown = spans(view)
    assert len(shown) == 50
    assert "".join(t for _, _, t in shown) == "".join(html.escape(shown_byte(b)) for b in text[250:])
    assert all(s == f"background:{W.PALETTE[e]}" for (s, _, _), e in zip(shown, ids[4, 250:, 0]))
    assert "weights" in shown[0][1]
    nav = W.LongContextNavigator(path, bins=16)
    np.testing.assert_allclose(nav.aggregate(0, 300).values, brute_bins(ids[2], 32, 0, 300, 16)[0])


@pytest.fixture(scope="module")
def recorded(model, store):
    """The store's tokens run in memory with router margins and the V4 indexer's picks recorded."""
    ids = torch.tensor([list(store[1])])
    _, cache = model.run_with_cache(ids, names=["layers.*.router.topk_ids", "layers.*.router.margin",
                                                "layers.*.attn.indexer_topk"])
    return A.from_cache(cache, ids, n_experts=32)


def test_dashboard_shows_the_share_of_tokens_near_a_flip(recorded, trace):
    ds = recorded
    dash = W.RoutingDashboard(ds, margins=True, threshold=2e-3)
    assert dash.children[1].children[1].children == (dash.heatmap, dash.margin_figure)  # below the sort and search
    m = ds.router_margin.values  # (layer, token); NaN at the hash-routed layers
    counted = (~np.isnan(m)).sum(1)
    want = np.where(counted > 0, (m < 2e-3).sum(1) / np.maximum(counted, 1), np.nan)
    assert np.isnan(want[:2]).all() and (want[2:] > 0).all() and (want[2:] < 1).all()
    np.testing.assert_array_equal(dash.margin_share.values, want)
    assert [list(r) for r in dash.margin_figure.data[0].z] == [[None]] * 2 + [[v] for v in want[2:]]
    median = np.nanmedian(m[2:], 1)
    np.testing.assert_allclose(dash.median_margin.values[2:], median, rtol=0.04)  # to the 10**(1/64) bins
    looser = W.RoutingDashboard(ds, margins=True, threshold=1e-1).margin_share.values[2:]
    np.testing.assert_array_equal(looser, (m[2:] < 1e-1).mean(1))
    assert len(W.RoutingDashboard(ds).children) == 3 and W.RoutingDashboard(ds).margin_figure is None
    with pytest.raises(wb.InputError, match=r"router_margin.*names=\['layers\.\*\.router\.margin'\]"):
        W.RoutingDashboard(trace[0], margins=True)


def test_navigator_shows_how_far_back_the_indexer_picks(recorded, trace):
    ds = recorded
    nav = W.LongContextNavigator(ds, bins=8, picks=True, rate=4)
    assert nav.children[-1] is nav.pick_figure and [b.name for b in nav.pick_figure.data] == ["layer 1", "layer 4"]
    n = ds.sizes["token"]
    for bar, layer in zip(nav.pick_figure.data, (1, 4)):
        picks = ds.attn_indexer_topk.sel(layer=layer).values  # (token, slots), -1 empty
        d = (np.arange(n)[:, None] - picks * 4)[picks >= 0]
        edges = [0, *(2 ** np.arange(int(np.ceil(np.log2(n))) + 1))]
        assert list(bar.y) == np.histogram(d, edges)[0].tolist() and sum(bar.y) == d.size > 0
        assert bar.x[0] == "0..0" and bar.x[-1] == f"{edges[-2]:,}..{edges[-1] - 1:,}"
    assert "rate 4" in nav.pick_figure.layout.title.text
    assert len(W.LongContextNavigator(ds, bins=8).children) == 2
    with pytest.raises(wb.InputError, match="rate="):
        W.LongContextNavigator(ds, bins=8, picks=True)
    with pytest.raises(wb.InputError, match=r"attn_indexer_topk.*names=\['layers\.\*\.attn\.indexer_topk'\]"):
        W.LongContextNavigator(trace[0], picks=True, rate=4)


# ---------------------------------------------------------------- a 1M-token store with 384 experts


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """A store of 1,048,576 tokens, 4 layers, 384 experts, top-8 (distinct ids drifting along the sequence),
    written directly with the attrs `open_store` reads."""
    T, L, E, k = 1 << 20, 4, 384, 8
    rng = np.random.default_rng(0)
    first = (rng.integers(0, 48, (L, T, 1)) + (np.arange(T) // 8192)[None, :, None]) % E
    ids = ((first + 48 * np.arange(k)) % E).astype(np.int16)
    ds = xr.Dataset({"topk_ids": (("layer", "token", "k"), ids),
                     "input_ids": ("token", rng.integers(0, 50_000, T).astype(np.int32))},
                    coords={"layer": np.arange(L), "token": np.arange(T)},
                    attrs={"workbench_store": 1, "committed_tokens": T, "complete": True, "n_experts": E, "k": k,
                           "routed_layers": list(range(L))})
    path = tmp_path_factory.mktemp("big") / "big.zarr"
    ds.chunk({"token": 16384}).to_zarr(path, zarr_format=3, consolidated=False)
    return path


def test_a_million_token_store_stays_small_in_the_browser(big_store):
    t0 = time.perf_counter()
    nav = W.LongContextNavigator(big_store)
    assert time.perf_counter() - t0 < 20
    assert nav.bins == 150_000 // 384 and np.shape(nav.figure.data[0].z) == (384, 390)
    assert payload(nav) < 2 * MB
    assert all(len(line.y) == 390 for line in nav.figure.data[1:]) and len(nav.figure.data) == 9
    tracemalloc.start()
    try:
        nav.view(0, 1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * MB  # blocks of 1M entries; the layer's 8M (bin, expert) cells at once would take 64 MB
    start = 1 << 19
    share = nav.aggregate(start, start + 8192)
    ids = wb.open_store(big_store).topk_ids.sel(layer=nav.layer).isel(token=slice(start, start + 8192)).values
    want, first = brute_bins(ids, 384, 0, 8192, 390)
    np.testing.assert_allclose(share.values, want, rtol=1e-12)
    assert share.bin_start.values.tolist() == [start + p for p in first]
    dash = W.RoutingDashboard(big_store)
    assert payload(dash) < 2 * MB and np.shape(dash.coactivation.data[0].z) == (384, 384)
    assert payload(W.TokenView(big_store, start=(1 << 20) - 100)) < 100_000


# ---------------------------------------------------------------- interventions on the embedded model


PROMPT = "def add(a, b):\n    return a"


def last_logits(model, ids, hooks=()) -> torch.Tensor:
    with torch.no_grad(), model.hooks(list(hooks)):
        return model(ids)[0, -1].float()


def test_intervention_panel_matches_manual_hooked_forwards(model):
    panel = W.InterventionPanel(model, PROMPT, layer=3, top=5)
    ids = torch.tensor([model.tokenizer.encode(PROMPT)])
    assert torch.equal(panel.ids, ids)
    base = last_logits(model, ids)
    _, cache = model.run_with_cache(ids, names=["layers.3.router.topk_ids"])
    routed = cache["layers.3.router.topk_ids"][0, -1].tolist()
    assert panel.routing[3] == routed and panel.expert_picker.value == (routed[0],)

    result = panel.run(3, [routed[0]], "ablate")
    p = base.softmax(-1)
    assert [(i, prob) for _, i, prob in result["baseline"]] == \
        [(int(i), pytest.approx(float(v), abs=1e-7)) for v, i in zip(*p.topk(5))]
    after = last_logits(model, ids, ablate(3, [routed[0]]))
    assert not torch.equal(after, base)
    q = after.softmax(-1)
    assert [(i, prob) for _, i, prob in result["intervened"]] == \
        [(int(i), pytest.approx(float(v), abs=1e-7)) for v, i in zip(*q.topk(5))]
    delta = after - base
    assert [i for _, i, *_ in result["logit_delta"]] == delta.abs().topk(5).indices.tolist()
    for _, i, before, now, change in result["logit_delta"]:
        assert (before, now, change) == pytest.approx((float(base[i]), float(after[i]), float(delta[i])), abs=1e-6)
    assert result["changed"] == (int(after.argmax()) != int(base.argmax()))

    forced = [(e + 1) % 32 for e in routed]
    result = panel.run(3, forced, "force")
    q = last_logits(model, ids, force(3, forced)).softmax(-1)
    assert [(i, prob) for _, i, prob in result["intervened"]] == \
        [(int(i), pytest.approx(float(v), abs=1e-7)) for v, i in zip(*q.topk(5))]

    panel.mode_picker.value = "force"
    panel.expert_picker.value = tuple(forced)
    panel.run_button.click()
    assert "force experts" in panel.output.value and panel.result["experts"] == forced
    panel.expert_picker.value = (0,)
    panel.run_button.click()
    assert "cannot run" in panel.output.value and "k=4" in panel.output.value


def test_intervention_panel_checks_arguments(model):
    ids = model.tokenizer.encode(PROMPT)
    panel = W.InterventionPanel(model, ids)
    assert panel.layer_picker.options == tuple(range(6)) and panel.layer_picker.value == 0
    assert f"prompt={len(ids)} tokens" in repr(panel)
    for args, message in [((9, [1], "ablate"), "layer"), ((3, [32], "ablate"), "experts"),
                          ((3, [1, 2], "force"), "k=4"), ((3, [1], "zap"), "mode"), ((3, [], "ablate"), "empty")]:
        with pytest.raises(ValueError, match=message):
            panel.run(*args)
    for prompt in ([], [ids, ids]):
        with pytest.raises(ValueError, match="prompt must be text or one non-empty sequence"):
            W.InterventionPanel(model, prompt)
    with pytest.raises(ValueError, match="top"):
        W.InterventionPanel(model, ids, top=0)


def test_intervention_panel_generates_side_by_side(model):
    """Each continuation is `model.generate` under the same hooks, token for token."""
    vector = torch.randn(model.embed.weight.shape[1], generator=torch.Generator().manual_seed(0))
    panel = W.InterventionPanel(model, PROMPT, layer=3, vectors={"random": vector})
    ids, n = panel.ids, 12

    def continuation(hooks=()) -> list[int]:
        with model.hooks(list(hooks)):
            return model.generate(ids, n, progress=False)[0, ids.shape[1]:].tolist()

    base = continuation()
    assert len(base) == n
    cases = [((3, [panel.routing[3][0]], "ablate"), {}, ablate(3, [panel.routing[3][0]])),
             ((3, [(e + 1) % 32 for e in panel.routing[3]], "force"), {}, force(3, [(e + 1) % 32 for e in
                                                                                    panel.routing[3]])),
             ((2, [], "steer"), dict(vector="random", scale=8.0), steer("layers.2.resid_post", vector, 8.0))]
    for args, kwargs, hooks in cases:
        result = panel.generate(*args, n, **kwargs)
        after = continuation(hooks)
        assert result["baseline_ids"] == base and result["intervened_ids"] == after
        assert result["baseline"] == model.tokenizer.decode(base)
        assert result["intervened"] == model.tokenizer.decode(after)
        parted = [i for i, (a, b) in enumerate(zip(base, after)) if a != b]
        assert result["diverged_at"] == (parted[0] if parted else None)
        assert panel.continuations.value == W.InterventionPanel.continuation_html(result)
    assert result["diverged_at"] is not None and result["scale"] == 8.0  # a strong random push changes the text
    assert html.escape(result["intervened"]) in panel._repr_mimebundle_()["text/html"]

    panel.mode_picker.value, panel.layer_picker.value, panel.new_tokens.value = "steer", 2, 5
    panel.scale_box.value = 8.0
    panel.generate_button.click()
    assert panel.generation["max_new_tokens"] == 5 and panel.generation["intervened_ids"] == after[:5]
    assert "steer layer 2 (scale 8)" in panel.continuations.value
    for kwargs, message in [(dict(mode="steer"), "steering needs a vector"),
                            (dict(mode="steer", vector="nope"), "not one of the panel's vectors"),
                            (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=message):
            panel.generate(3, [1], **kwargs)
    assert "steer" not in W.InterventionPanel(model, PROMPT).mode_picker.options  # no vectors, no steering


# ---------------------------------------------------------------- static snapshots


def png_size(snapshot: str, title: str) -> tuple[int, int]:
    """(width, height) of the inline PNG whose alt text is `title`."""
    import base64
    import io

    from PIL import Image

    data = re.search(rf"<img alt='{re.escape(html.escape(title))}' src='data:image/png;base64,([^']+)'", snapshot)
    assert data, f"no image {title!r}"
    return Image.open(io.BytesIO(base64.b64decode(data[1]))).size


def test_every_widget_carries_a_static_snapshot(trace, model):
    """Where no kernel runs a widget (published HTML, GitHub), its bundle's text/html shows the data it shows
    live; JupyterLab still gets the widget view."""
    ds, ids, _ = trace
    dash = W.RoutingDashboard(ds, layer=11, expert=3)
    bundle = dash._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "static snapshot of RoutingDashboard" in \
        bundle["text/html"]
    snap = bundle["text/html"]
    load_title = wb.display.routing_summary(dash.load)["heatmap"]["title"]
    assert png_size(snap, load_title)[1] > png_size(snap, load_title)[0] / 10  # 3 layers x 8 experts drawn
    assert "co-activation, layer 11" in snap and "selected: layer 11, expert 3" in snap and "<b>tokens</b> 203" in snap

    view = W.TokenView(ds, layer=12, start=10, length=20, decode=str)
    snap = view._repr_mimebundle_()["text/html"]
    assert view.html() in snap and view.legend.value in snap and len(spans(view)) == 20

    nav = W.LongContextNavigator(ds, layer=10, bins=50)
    nav.view(20, 120)
    snap = nav._repr_mimebundle_()["text/html"]
    title = "expert load along the sequence, layer 10: tokens 20..120 in 50 bins"
    assert f"<strong>{title}</strong>" in snap
    width, height = png_size(snap, title)
    assert width >= 50 and height >= 8 * 2

    panel = W.InterventionPanel(model, PROMPT, layer=3, top=3)
    assert "routed to experts" in panel._repr_mimebundle_()["text/html"]
    result = panel.run(3, [panel.routing[3][0]], "ablate")  # a run from code shows in the widget too
    assert panel.output.value == W.InterventionPanel.table_html(result)
    assert panel.output.value in panel._repr_mimebundle_()["text/html"]
