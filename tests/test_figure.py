"""The widgets' plotly figures open with a small message and get plotly's bundle once per page: from the
server extension, else from the kernel in chunks (the browser test drives both in JupyterLab)."""

from importlib.metadata import version

import plotly.graph_objects as go

from moe_workbench_jupyterlab.handlers import plotly_bundle
from workbench.widgets.figure import BUNDLE, CHUNK_BYTES, FigureWidget


def test_opening_state_leaves_plotlys_bundle_out():
    z = [[1.0, 2.0], [3.0, 4.0]]
    ours, stock = FigureWidget(go.Heatmap(z=z)), go.FigureWidget(go.Heatmap(z=z))
    assert len(stock.get_state()["_esm"].encode()) == BUNDLE.stat().st_size > 4_000_000  # what a stock figure sends
    state = ours.get_state()
    assert len(state["_esm"]) < 4096 and "import(" in state["_esm"]
    assert state["_plotly_bundle"] == f"moe-workbench/plotly/{version('plotly')}/widgetbundle.js"
    traces = [state["_widget_data"], stock.get_state()["_widget_data"]]  # the figure itself: plotly's, unchanged
    plain = [[{k: v for k, v in t.items() if k != "uid"} for t in d] for d in traces]
    assert plain == [[{"type": "heatmap", "z": z}]] * 2


def test_kernel_sends_the_bundle_in_numbered_chunks_on_request(monkeypatch):
    fig = FigureWidget(go.Bar(y=[1, 2]))
    sent = []
    monkeypatch.setattr(fig, "send", lambda content, buffers=None: sent.append((content, buffers)))
    fig._handle_custom_msg({"mwb": "something else"}, [])
    assert sent == []
    fig._handle_custom_msg({"mwb": "plotly-bundle"}, [])
    data = BUNDLE.read_bytes()
    assert len(sent) == -(-len(data) // CHUNK_BYTES) >= 5
    assert [c for c, _ in sent] == [{"mwb": "plotly-chunk", "index": i, "count": len(sent)} for i in range(len(sent))]
    assert all(len(b[0]) <= CHUNK_BYTES for _, b in sent)
    assert b"".join(b[0] for _, b in sent) == data


def test_server_extension_serves_the_kernels_plotly():
    found = plotly_bundle()
    assert found is not None and found == (version("plotly"), BUNDLE)
