"""The comparison view (workbench.widgets.RoutingComparison): its bars, token window, divergence navigation
and layer selection against numpy over two known routings, and the embedded model's fp32 store against its
bf16 store."""

import html
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from plotly.callbacks import InputDeviceState, Points

import workbench as wb
from test_analysis import dataset, routing
from workbench import widgets as W
from workbench.demo import EMBEDDED_MODEL
from workbench.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
E, K = 8, 2
CHANGED = {11: [5, 17, 40, 150, 202], 12: [3, 17]}  # layer -> tokens whose expert set b changes there
REORDERED = (10, 8)  # (layer, token) whose two experts b swaps: the same set, not a divergence


def perturbed(ids: np.ndarray) -> np.ndarray:
    """`ids` with the sets of CHANGED changed (second expert replaced by one outside the set) and REORDERED's
    order swapped."""
    out = ids.copy()
    for layer, tokens in CHANGED.items():
        for t in tokens:
            row = out[layer - 10, t]
            row[1] = next(e for e in range(E) if e not in row)
    layer, t = REORDERED
    out[layer - 10, t] = out[layer - 10, t, ::-1]
    return out


@pytest.fixture(scope="module")
def pair():
    """(a, b, ids_a, ids_b): 203 tokens, layers 10..12, 8 experts, top-2, b perturbed; a dask-chunked by 7."""
    ids = routing(203, 3, E, K, seed=0)
    other = perturbed(ids)
    return dataset(ids, E, chunk=7), dataset(other, E), ids, other


def spans(view: W.RoutingComparison) -> list[tuple[str, str, str, str]]:
    """(class, style, title, text) of every token span in the view's window."""
    return [(c, s, html.unescape(t), html.unescape(x)) for c, s, t, x in
            re.findall(r'<span class="([^"]*)" style="([^"]*)" title="([^"]*)">([^<]*)</span>', view.html())]


def marked(view: W.RoutingComparison) -> list[int]:
    """Positions of the window's tokens marked as differing."""
    return [view.start + j for j, (c, *_) in enumerate(spans(view)) if c == "mwb-diff"]


def click(view: W.RoutingComparison, layer: int) -> None:
    """What a click on the agreement bar of `layer` does in the browser."""
    view.bars.data[0]._dispatch_on_click(Points(point_inds=[0], xs=[str(layer)], ys=[0.5], trace_index=0),
                                         InputDeviceState())


def sets(row: np.ndarray) -> str:
    return "{" + ", ".join(map(str, sorted(int(e) for e in row))) + "}"


def test_bars_hold_agreement_and_jaccard(pair):
    a, b, x, y = pair
    view = W.RoutingComparison(a, b, names=("fp32", "bf16"))
    same = (np.sort(x, -1) == np.sort(y, -1)).all(-1)  # [L, T]
    inter = (x[..., :, None] == y[..., None, :]).any(-1).sum(-1)
    np.testing.assert_allclose(view.result.agreement.values, same.mean(1))
    np.testing.assert_allclose(view.result.agreement.values, [1, 1 - 5 / 203, 1 - 2 / 203])
    np.testing.assert_allclose(view.result.jaccard.values, (inter / (2 * K - inter)).mean(1))
    agree, jaccard = view.bars.data
    assert list(agree.x) == ["10", "11", "12"] and view.bars.layout.xaxis.type == "category"
    np.testing.assert_allclose(agree.y, same.mean(1))
    np.testing.assert_allclose(jaccard.y, (inter / (2 * K - inter)).mean(1))
    assert [c[0] for c in agree.customdata] == [203, 198, 201]  # tokens with the same set, in the hover
    assert tuple(view.bars.layout.yaxis.range) == (0, 1)
    assert view.bars.layout.title.text == "fp32 vs bf16: expert sets per layer over 203 tokens"
    assert list(agree.marker.pattern.shape) == ["", "", ""]  # no layer hash-routed here
    table = view.static_html()
    assert "<td>11</td><td>97.5 %</td>" in table and "<td>12</td><td>99.0 %</td>" in table
    assert "<td>10</td><td>100.0 %</td><td>100.0 %</td>" in table
    bundle = view._repr_mimebundle_()
    assert "mwb-comparison" in bundle["text/html"] and "97.5 %" in bundle["text/html"]


def test_window_marks_the_first_divergent_layer(pair):
    a, b, x, y = pair
    view = W.RoutingComparison(a, b, length=50)
    assert marked(view) == [3, 5, 17, 40]  # token 8 swaps its experts at layer 10: the same set
    shown = spans(view)
    first = {3: 12, 5: 11, 17: 11, 40: 11}
    for t, layer in first.items():
        cls, style, title, text = shown[t]
        i = layer - 10
        assert title == (f"token {t}: {text} | first differs at layer {layer}: a {sets(x[i, t])} vs b "
                         f"{sets(y[i, t])}")
    assert shown[3][1] != shown[5][1] == shown[17][1]  # coloured by layer
    assert shown[0][1].startswith("background:#ffffff") and shown[0][2].endswith("same experts at every layer")
    assert [s[3] for s in shown] == [W.common.byte_text(int(t)) for t in a.input_ids.values[:50]]  # ids < 256
    win = view.window()
    np.testing.assert_array_equal(win.a_topk_ids.values, x[:, :50])
    np.testing.assert_array_equal(win.b_topk_ids.values, y[:, :50])
    assert np.flatnonzero(win.differs.values.any(0)).tolist() == [3, 5, 17, 40]
    assert "layer 11: 3" in view.legend.value and "layer 12: 1" in view.legend.value
    assert "same at every layer: 46" in view.legend.value and "4 differ at any layer" in view.header.value


def test_next_divergence_jumps_past_the_window(pair):
    a, b, _, _ = pair
    view = W.RoutingComparison(a, b, length=60)
    assert view.next_divergence() == 150 and view.start == 150 and marked(view) == [150, 202]  # ends at 203
    view.length_box.value = 10
    assert view.next_divergence() == 202 and marked(view) == [202]
    assert view.next_divergence() is None and view.start == 202  # nothing further: the window stays
    view.start_box.value = 0
    view.divergence_button.click()
    assert view.start == 17  # the first after tokens 0..9 (3 and 5 are inside the window)
    assert view.diverging_tokens().tolist() == [3, 5, 17, 40, 150, 202]
    assert view.diverging_tokens(11).tolist() == [5, 17, 40, 150, 202]
    assert view.diverging_tokens(12, limit=1).tolist() == [3]
    assert view.diverging_tokens(10).tolist() == []


def test_a_bar_click_selects_its_layer(pair):
    a, b, x, y = pair
    view = W.RoutingComparison(a, b, length=50)
    click(view, 12)
    assert view.layer == 12 and marked(view) == [3, 17]
    assert list(view.bars.data[0].marker.line.width) == [0, 0, 3]
    t = 17
    assert spans(view)[t][2] == f"token {t}: {spans(view)[t][3]} | differs at layer 12: a {sets(x[2, t])} vs b " \
                                f"{sets(y[2, t])}"
    assert spans(view)[5][2].endswith(f"same experts at layer 12: {sets(x[2, 5])}")  # differs at 11 only
    assert "differ at layer 12" in view.header.value and "layer 12: " in view.legend.value
    win = view.window()
    assert win.a_topk_ids.dims == ("token", "k")
    np.testing.assert_array_equal(win.b_topk_ids.values, y[2, :50])
    assert view.next_divergence() is None  # nothing differs at layer 12 after token 50
    click(view, 11)
    assert view.next_divergence() == 150 and marked(view) == [150]
    assert view.next_divergence() == 202 and marked(view) == [202]
    view.all_layers_button.click()
    assert view.layer is None and view.window().a_topk_ids.dims == ("layer", "token", "k")


def test_a_dump_without_input_ids_and_errors(pair):
    a, b, x, _ = pair
    view = W.RoutingComparison(a, b.drop_vars("input_ids"), length=20)
    assert "input_ids" in view.window() and spans(view)[3][0] == "mwb-diff"  # a's tokens are shown
    bare = W.RoutingComparison(a.drop_vars("input_ids"), b.drop_vars("input_ids"), length=20)
    assert "input_ids" not in bare.window() and {s[3] for s in spans(bare)} == {"·"}
    assert marked(bare) == [3, 5, 17]
    with pytest.raises(InputError, match="203 vs 200 tokens"):
        W.RoutingComparison(a, dataset(x[:, :200], E))
    with pytest.raises(InputError, match="different tokens"):
        W.RoutingComparison(a, dataset(x, E, tokens=np.arange(203)))
    with pytest.raises(ValueError, match="length must be an integer between 1 and 4096"):
        W.RoutingComparison(a, b, length=W.MAX_WINDOW + 1)
    with pytest.raises(ValueError, match="start must be an integer between 0 and 202"):
        W.RoutingComparison(a, b, start=203)
    with pytest.raises(ValueError, match="names must be two different strings"):
        W.RoutingComparison(a, b, names=("x", "x"))
    with pytest.raises(ValueError, match=r"routed layers \[10, 11, 12\], got 9"):
        view.select(9)
    with pytest.raises(ValueError, match="limit must be an integer"):
        view.diverging_tokens(limit=0)
    with pytest.raises(ValueError, match="source must be a store path or an xarray Dataset"):
        W.RoutingComparison(a, x)


def test_fp32_store_against_bf16_store(tmp_path):
    """The embedded model traced in fp32 and in bf16 over 200 bytes of held-out code: the view reads both
    stores and agrees with numpy over their ids; the hash-routed first layers agree everywhere."""
    tokens = np.frombuffer((ROOT / "data" / "corpus" / "code.heldout.txt").read_bytes()[:200], np.uint8)
    threads, paths = torch.get_num_threads(), []
    torch.set_num_threads(1)
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model = wb.load(EMBEDDED_MODEL, dtype=dtype)
            paths.append(wb.trace(model, tokens.astype(np.int64), tmp_path / f"{name}.zarr", chunk_tokens=64,
                                  progress=False))
    finally:
        torch.set_num_threads(threads)
    view = W.RoutingComparison(*paths, names=("fp32", "bf16"), length=200)
    x, y = (wb.open_store(p) for p in paths)
    routed = view.layers
    ix, iy = x.topk_ids.sel(layer=routed).values, y.topk_ids.sel(layer=routed).values
    same = (np.sort(ix, -1) == np.sort(iy, -1)).all(-1)
    np.testing.assert_allclose(view.bars.data[0].y, same.mean(1))
    hashed = view.result.hash_routed.values
    assert hashed[:2].all() and same[hashed].all()
    assert list(view.bars.data[0].marker.pattern.shape[:2]) == ["/", "/"]
    assert marked(view) == np.flatnonzero(~same.all(0)).tolist() and 0 < len(marked(view)) < 200
    assert "".join(s[3] for s in spans(view)) == "".join(W.common.byte_text(int(t)) for t in tokens)
    assert str(paths[0]) in view.header.value


def test_a_full_window_stays_small():
    """MAX_WINDOW tokens that differ at every layer: the largest window the view sends, under 2 MB."""
    ids = routing(5000, 3, 64, 8, seed=3)
    view = W.RoutingComparison(dataset(ids, 64), dataset(np.roll(ids, 1, axis=1), 64), length=W.MAX_WINDOW)
    assert len(marked(view)) > 0.99 * W.MAX_WINDOW
    assert len(view.html()) + len(view.legend.value) + len(view.header.value) < 2 << 20
