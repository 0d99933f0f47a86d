"""The expert profile view (widgets.ExpertProfile): its top-tokens table against numpy counts over the store's
arrays, each token's routing at every layer against the store, the causal importance against a sweep of the
embedded model, the ablate button against the intervention panel's own run, and its place in the dashboard."""

import html
import re

import ipywidgets
import numpy as np
import pytest
import torch
from plotly.callbacks import InputDeviceState, Points

import workbench as wb
from test_analysis import dataset, routing
from workbench import widgets as W
from workbench.causal import open_sweep, sweep
from workbench.errors import InputError

ROW = re.compile(r"<tr title='routing at position (\d+): ([^']*)'><td class='mwb-token' data-token-id='(\d+)'>"
                 r"<code>([^<]*)</code></td><td>([\d,]+)</td><td>([\d,]+)</td><td><code>([^<]*)</code></td></tr>")


def rows(view: W.ExpertProfile) -> list[tuple[int, str, int, str, int, int]]:
    """(position, routing, id, token text, taken, occurrences) of each row of the top-tokens table."""
    table = view.tokens_table.value
    assert table.startswith("<table class='mwb-profile-tokens'>")
    return [(int(q), html.unescape(r), int(t), html.unescape(s), int(n.replace(",", "")), int(m.replace(",", "")))
            for q, r, t, s, n, m, _ in ROW.findall(table)]


def parse_routing(text: str) -> dict[int, list[int]]:
    """"L0: 3,17 | L1: 5,9" as {0: [3, 17], 1: [5, 9]}."""
    return {int(a): [int(e) for e in b.split(",")] for a, b in re.findall(r"L(\d+): ([\d,]+)", text)}


def numpy_top(ids: np.ndarray, inputs: np.ndarray, expert: int, n: int = 10) -> list[tuple[int, int, int]]:
    """(id, taken, occurrences) of the n input ids most often among the tokens whose top-k holds `expert`."""
    taken = np.bincount(inputs[(ids == expert).any(1)], minlength=inputs.max() + 1)
    occurrences = np.bincount(inputs, minlength=inputs.max() + 1)
    top = sorted(np.flatnonzero(taken), key=lambda t: (-taken[t], t))[:n]
    return [(int(t), int(taken[t]), int(occurrences[t])) for t in top]


@pytest.fixture(scope="module")
def trace():
    """(ds, ids, domains): 203 tokens, layers 10-12, 8 experts, top-2, dask chunks of 7 tokens."""
    ids = routing(203, 3, 8, 2, seed=0, dead=(7,), skew=1.0)
    domains = np.array(["code", "prose", "math"])[np.random.default_rng(5).integers(0, 3, 203)]
    return dataset(ids, 8, chunk=7), ids, domains


@pytest.fixture(scope="module")
def model(embedded):
    return embedded


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    """A store of the embedded model over 300 bytes of held-out code."""
    text = (wb.demo.CORPUS / "code.heldout.txt").read_bytes()[:300]
    tokens = np.frombuffer(text, np.uint8).astype(np.int64)
    return wb.trace(model, tokens, tmp_path_factory.mktemp("profile") / "run.zarr", chunk_tokens=128, progress=False)


def test_top_tokens_table_and_snapshot_match_numpy(trace):
    ds, ids, domains = trace
    view = W.ExpertProfile(ds, 12, 3, labels=domains)
    inputs = ds.input_ids.values.astype(np.int64)
    shown = rows(view)
    assert [(t, n, m) for _, _, t, _, n, m in shown] == numpy_top(ids[2], inputs, 3)
    assert [s for _, _, t, s, _, _ in shown] == [wb.widgets.common.byte_text(t) for _, _, t, _, _, _ in shown]
    assert all(inputs[q] == t and 3 in ids[2, q] for q, _, t, _, _, _ in shown)  # the example takes the expert
    assert all(parse_routing(r) == {10 + i: ids[i, q].tolist() for i in range(3)} for q, r, *_ in shown)
    hit = (ids[2] == 3).any(1)
    assert view.title.startswith(f"expert 3, layer 12: takes {hit.sum()} of 203 tokens")
    assert view.profile_figure.layout.title.text == view.title
    snap = view._repr_mimebundle_()["text/html"]
    assert html.escape(view.title) in snap and view.tokens_table.value in snap
    for d in ("code", "math", "prose"):  # domain shares in percent, one decimal
        share = hit[domains == d].mean()
        assert f"<tr><td>{d}</td><td>{100 * share:.1f}%</td><td>{hit[domains == d].sum()} of " \
               f"{(domains == d).sum()}</td>" in snap
    assert "mwb-profile-causal" not in snap and view.ablate_button is None  # no sweep, no panel
    assert not any(isinstance(c, ipywidgets.HBox) for c in view.children)
    view.select(10, 0)
    assert [(t, n, m) for _, _, t, _, n, m in rows(view)] == numpy_top(ids[0], inputs, 0)
    assert view.selected == (10, 0) and view.title.startswith("expert 0, layer 10:")


def test_routing_at_every_layer_matches_the_store(store):
    ds = wb.open_store(store)
    topk = ds.topk_ids.values  # [layer, token, k]
    view = W.ExpertProfile(store, 4, None)
    layer, expert = view.selected
    assert expert == int(np.bincount(topk[4].ravel(), minlength=32).argmax())  # the busiest expert by default
    shown = rows(view)
    inputs = ds.input_ids.values.astype(np.int64)
    assert [(t, n, m) for _, _, t, _, n, m in shown] == numpy_top(topk[4], inputs, expert)
    layers = ds.layer.values.tolist()
    for q, text, *_ in shown:
        assert parse_routing(text) == {x: topk[i, q].tolist() for i, x in enumerate(layers)}
    tokens, strongest = view.profile_figure.data[:2]
    for hover, (q, text, *_) in zip(tokens.hovertext, shown):
        assert parse_routing(hover.split(f"routing at position {q}:")[1]) == parse_routing(text)
    assert len(strongest.x) == 10  # no labels: the highest weights, each hover with its routing at every layer
    for q, hover in zip(strongest.x, strongest.hovertext):
        routed = parse_routing(hover.split(f"routing at position {q}:")[1])
        assert routed == {x: topk[i, int(q)].tolist() for i, x in enumerate(layers)} and expert in routed[4]


def test_causal_importance_shows_the_sweep(model, store, tmp_path):
    g = torch.Generator().manual_seed(0)
    texts = {d: torch.randint(0, 256, (16,), generator=g) for d in ("code", "prose")}
    path = sweep(model, texts, tmp_path / "sweep.zarr", layers=[3], progress=False)
    swept = open_sweep(path)
    delta = swept.delta_loss.sel(layer=3).values  # [domain, expert]
    expert = int(np.abs(delta).sum(0).argmax())
    assert np.abs(delta[:, expert]).max() > 0
    view = W.ExpertProfile(store, 3, expert, sweep=path)
    np.testing.assert_array_equal(view.importance.values, delta[:, expert])
    table = view.causal.value
    assert "loss change (nats)" in table and table.startswith("<table class='mwb-profile-causal'>")
    shown = re.findall(r"<tr><td>(\w+)</td><td>([-+.\de]+)</td><td>([.\de+-]+)</td><td>(\d+)</td></tr>", table)
    assert [d for d, *_ in shown] == ["code", "prose"]
    np.testing.assert_allclose([float(v) for _, v, _, _ in shown], delta[:, expert], rtol=1e-3)
    np.testing.assert_allclose([float(c) for _, _, c, _ in shown], swept.clean_loss.values, rtol=1e-3)
    assert [int(n) for *_, n in shown] == [15, 15]
    mean = float(re.search(r"all \(token-weighted\)</td><td>([-+.\de]+)<", table)[1])
    assert mean == pytest.approx(delta[:, expert].mean(), rel=1e-3)  # equal token counts: the plain mean
    assert table in view._repr_mimebundle_()["text/html"]
    view.select(4, expert)
    assert view.importance is None
    assert view.causal.value == (f"<p class='mwb-profile-causal'>causal importance: expert {expert} at layer 4 is "
                                 "not in the sweep (its layers: 3)</p>")
    assert W.ExpertProfile(store, 3, expert).causal.value == ""  # no sweep: nothing said


def test_ablate_button_drives_the_intervention_panel(model, store):
    prompt = "def add(a, b):\n    return a"
    panel = W.InterventionPanel(model, prompt, layer=2, top=5)
    view = W.ExpertProfile(store, 4, 7, panel=panel)
    assert view.ablate_button.description == "ablate in panel" and view.ablate_button in view.children[-1].children
    view.ablate_button.click()
    got = panel.result
    assert (panel.layer_picker.value, panel.expert_picker.value, panel.mode_picker.value) == (4, (7,), "ablate")
    assert panel.output.value == W.InterventionPanel.table_html(got)
    want = W.InterventionPanel(model, prompt, top=5).run(4, [7], "ablate")
    assert got == want and got["layer"] == 4 and got["experts"] == [7]
    assert view.message.value.startswith("ablated expert 7 at layer 4 in the panel")


def test_errors(trace, model):
    ds, _, _ = trace
    with pytest.raises(ValueError, match=r"layer must be one of the routed layers \[10, 11, 12\], got 3"):
        W.ExpertProfile(ds, 3, 0)
    with pytest.raises(ValueError, match="expert must be an integer between 0 and 7, got 8"):
        W.ExpertProfile(ds, 10, 8)
    with pytest.raises(InputError, match="sweep must be a causal sweep"):
        W.ExpertProfile(ds, 10, 0, sweep=ds)
    view = W.ExpertProfile(ds, 10, 0)
    with pytest.raises(ValueError, match="expert must be"):
        view.select(10, -1)
    assert view.selected == (10, 0)
    with pytest.raises(InputError, match="no intervention panel"):
        view.ablate_in_panel()
    panel = W.InterventionPanel(model, [1, 2, 3])
    view = W.ExpertProfile(ds, 12, 1, panel=panel)
    with pytest.raises(InputError, match=r"layer 12 is not an MoE layer of the panel's model \(its MoE layers: "
                                         r"\[0, 1, 2, 3, 4, 5\]\)"):
        view.ablate_in_panel()
    view.ablate_button.click()
    assert "cannot ablate" in view.message.value and "layer 12 is not an MoE layer" in view.message.value
    assert panel.result is None


def test_partner_click_and_the_dashboard(trace):
    ds, ids, domains = trace
    view = W.ExpertProfile(ds, 11, 2)
    partner = view.profile_figure.data[3].x[0]
    view.profile_figure.data[3]._dispatch_on_click(Points(point_inds=[0], xs=[partner], ys=[0], trace_index=3),
                                                   InputDeviceState())
    assert view.selected == (11, int(partner)) and view.profile.attrs["expert"] == int(partner)
    dash = W.RoutingDashboard(ds, labels=domains, layer=12, expert=3)
    assert isinstance(dash.profile_view, W.ExpertProfile) and dash.profile_view.dataset is dash.dataset
    assert dash.profile is dash.profile_view.profile and dash.profile_figure is dash.profile_view.profile_figure
    dash.select(10, 4)
    assert dash.profile_view.selected == (10, 4) and dash.profile.attrs["layer"] == 10
    assert dash.profile_view.tokens_table.value in dash._repr_mimebundle_()["text/html"]
