"""Notebook widgets over routing data: a routing dashboard, a token view, a long-context navigator and an
intervention panel. Each is an `ipywidgets.VBox` (it displays itself) whose data path lives in plain methods
that run without a browser.

`source` is a routing Dataset (`wb.open_store(path)`, `analysis.from_cache(...)`) or a store path. Counting
happens here in Python, streaming the store in blocks (the analyses in `workbench.analysis`, or bounded
blocks of one layer for the navigator); the browser only receives aggregates. Payloads stay small: E x E
and bins x E matrices are rounded to 1/1000 of their largest value (2-D arrays travel as JSON text), and the
navigator caps bins x experts at MAX_CELLS values, so a 1M-token store with 384 experts sends well under
2 MB per widget.

Each widget's display bundle also carries `text/html`: a static snapshot of what it shows when displayed (the
load heatmap, the coloured tokens, the navigator's heatmap, the panel's last result), which is what a notebook
shows where no kernel runs the widget: published HTML, GitHub, nbviewer.
"""

from __future__ import annotations

import colorsys
import html
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import torch
import xarray as xr
from plotly.subplots import make_subplots

from . import analysis as A
from . import colours, display
from .analysis.dataset import dims_first
from .analysis.fragility import MARGIN
from .analysis.scan import scan_blocks
from .errors import InputError
from .interventions import ablate, force, steer
from .models.moe import Router
from .schema import ROUTER_TOPK_IDS, ROUTING_VARIABLES
from .store import open_store

# 32 categorical colours (16 hues at two lightnesses, all readable under black text); expert e gets
# PALETTE[e % 32], in the token view and in the navigator's lines alike
PALETTE = tuple("#%02x%02x%02x" % tuple(round(255 * c) for c in colorsys.hls_to_rgb(
    (i * 5 % 16) / 16, 0.80 if i < 16 else 0.64, 0.70)) for i in range(32))
MAX_CELLS = 150_000  # the navigator's bins x experts bound: about 1.3 MB of heatmap as JSON
MAX_WINDOW = 4096  # tokens one TokenView window may show
BLOCK_ENTRIES = 1 << 20  # routing entries (tokens x k) the navigator reads per block
Source = xr.Dataset | str | os.PathLike


def _open(source: Source) -> tuple[xr.Dataset, str]:
    """The routing Dataset of `source` (routed layers only, topk_ids as layer, token, k) and a name for it."""
    if isinstance(source, (str, os.PathLike)):
        ds, name = open_store(source), str(source)
    elif isinstance(source, xr.Dataset):
        ds, name = source, str(source.encoding.get("source", "in-memory Dataset"))
    else:
        raise ValueError(f"source must be a store path or an xarray Dataset, got {type(source).__name__}")
    try:
        ds = A.routed_view(ds)
        A.expert_count(ds)
    except ValueError as e:
        raise ValueError(f"source {name}: {e}") from None
    if ds.sizes["token"] == 0:
        raise ValueError(f"source {name} holds no tokens")
    return ds, name


def _layers(ds: xr.Dataset) -> list[int]:
    return [int(x) for x in ds.layer.values]


def _check_layer(layer: Any, layers: list[int]) -> int:
    """`layer` as an int, if it is one of `layers`; else a ValueError naming them."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in layers:
        raise ValueError(f"layer must be one of the routed layers {layers}, got {layer!r}")
    return int(layer)


def _pick_layer(layer: int | None, layers: list[int], hashed: Sequence[bool]) -> int:
    """`layer` checked against `layers`; by default the first layer not hash-routed (else the first)."""
    if layer is None:
        return next((x for x, h in zip(layers, hashed) if not h), layers[0])
    return _check_layer(layer, layers)


def _check_int(value: Any, name: str, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], else a ValueError naming `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")
    return int(value)


def _byte_text(i: int) -> str:
    """A byte-level token as text: printable ASCII as itself, anything else escaped (\\n, \\x00)."""
    if 32 <= i < 127:
        return chr(i)
    return {9: "\\t", 10: "\\n", 13: "\\r"}.get(i, f"\\x{i:02x}")


def _visible(text: str) -> str:
    """`text` with control characters escaped, so whitespace tokens show."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _color(expert: int) -> str:
    return PALETTE[expert % len(PALETTE)]


def _compact(matrix: np.ndarray) -> list[list[float | None]]:
    """A matrix for a heatmap as nested lists rounded to 1/1000 of its largest value or finer, NaN as None:
    a FigureWidget sends 2-D arrays to the browser as JSON text, so this keeps a 384 x 384 matrix near 1.3 MB
    and valid JSON."""
    finite = matrix[np.isfinite(matrix)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    rounded = np.round(matrix, 3 - math.floor(math.log10(top)) if top > 0 else 0)
    return [[None if x != x else x for x in row] for row in rounded.tolist()]


def _position(p: int) -> str:
    """A token position in a few characters: 987, 12K, 1.05M."""
    return f"{p / 1e6:.2f}M" if p >= 1_000_000 else f"{p / 1e3:.0f}K" if p >= 10_000 else str(p)


class _Snapshot:
    """Adds `text/html` to a widget's display bundle: a static snapshot (`static_html`) of what it shows, for
    wherever no kernel runs the widget. JupyterLab still draws the live widget (its MIME type ranks first)."""

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/html"] = (f"<div class='mwb-snapshot'>{self.static_html()}<p><small>static snapshot of "
                               f"{html.escape(type(self).__name__)}: run the notebook for the interactive "
                               "widget</small></p></div>")
        return bundle


# ---------------------------------------------------------------- routing dashboard


class RoutingDashboard(_Snapshot, ipywidgets.VBox):
    """Expert load per layer on the diverging scale around the uniform share 1/E (click a cell to select a
    layer and expert), the selected layer's co-activation matrix and the selected expert's profile at that
    layer (`analysis.expert_profile`): the tokens it takes most often in context, its share of each domain's
    tokens (`labels`: one domain per token) or else its highest-weight tokens, its load along position and its
    co-activation partners. Expert ids are local to a layer, so no figure puts one id across layers.

    `sort="load"` orders each layer's experts by load (the x axis is then the rank within the layer and the
    hover names the expert); `compact=True` draws thin rows for long lists of layers (DeepSeek-V4's 43-61).
    `decode` maps a token id to text (bytes as text for a byte-level vocabulary, else the id).
    `margins=True` adds, beside the load, each layer's share of tokens whose routing margin (`router_margin`)
    is below `threshold` (near a flip), with the median margin in the hover."""

    def __init__(self, source: Source, *, labels: Any = None, layer: int | None = None,
                 expert: int | None = None, sort: str = "id", compact: bool = False,
                 decode: Callable[[int], str] | None = None, margins: bool = False, threshold: float = 1e-3):
        super().__init__()
        if sort not in ("id", "load"):
            raise ValueError(f"sort must be 'id' or 'load', got {sort!r}")
        self.dataset, self.source = _open(source)
        ds = self.dataset
        self.layers, self.n_experts, self.k = _layers(ds), A.expert_count(ds), ds.sizes["k"]
        self.labels, self.sort = labels, sort
        self.decode = decode or (_byte_text if "input_ids" in ds and int(ds.input_ids.max()) < 256 else str)
        self.load = A.expert_load(ds)
        self.coactivation_data = A.coactivation(ds)
        share = self.load.share.values
        # order[i]: layer i's experts as drawn left to right
        self.order = (np.argsort(-share, axis=1, kind="stable") if sort == "load"
                      else np.tile(np.arange(self.n_experts), (len(self.layers), 1)))
        hashed = self.load.hash_routed.values.tolist()
        layer = _pick_layer(layer, self.layers, hashed)
        if expert is None:
            expert = int(self.load.share.sel(layer=layer).argmax("expert"))
        self.header = ipywidgets.HTML(self._header(hashed))
        rows = np.arange(len(self.layers))[:, None]
        relative = self.load.relative_load.values
        self.heatmap = go.FigureWidget(go.Heatmap(
            z=_compact(share[rows, self.order]), x=list(range(self.n_experts)), y=self.layers,
            customdata=np.stack([self.order, np.round(relative[rows, self.order], 2)], -1).tolist(),
            **colours.diverging(1 / self.n_experts), colorbar=dict(title="share<br>(white: 1/E)"),
            hovertemplate="layer %{y}, expert %{customdata[0]}<br>share of the layer's slots %{z:.4f}<br>"
                          "%{customdata[1]:.2f} x uniform (k/E of the tokens)<extra></extra>"))
        row_height = 8 if compact else 28
        self.heatmap.update_layout(
            title="expert load" + (" (experts sorted by load within each layer)" if sort == "load" else ""),
            xaxis_title="expert" if sort == "id" else "rank by load within the layer",
            height=120 + row_height * len(self.layers), margin=dict(t=50, b=40),
            yaxis=dict(title="layer", autorange="reversed",  # first layer on top, as the renderer draws
                       **({} if compact else dict(tickmode="array", tickvals=self.layers))))
        self.heatmap.data[0].on_click(self._on_click)
        self.margin_figure = self._margin_figure(threshold, self.heatmap.layout.height) if margins else None
        self.coactivation = go.FigureWidget(go.Heatmap(
            x=list(range(self.n_experts)), y=list(range(self.n_experts)), **colours.sequential(),
            hovertemplate="of the tokens that chose expert %{y}, %{z:.3f} also chose %{x}<extra></extra>"))
        self.coactivation.update_layout(xaxis_title="expert j", yaxis=dict(title="expert i", autorange="reversed"),
                                        width=440, height=440, margin=dict(t=50))
        self.coactivation.data[0].on_click(self._on_coactivation_click)
        second = "share of each domain's tokens" if labels is not None else "highest routing weights"
        fig = make_subplots(rows=2, cols=2, vertical_spacing=0.2, horizontal_spacing=0.22,
                            subplot_titles=["tokens it takes most often", second, "load along position",
                                            "co-activation partners"])
        for row, col in ((1, 1), (1, 2), (2, 1), (2, 2)):
            fig.add_trace(go.Bar(orientation="h" if (row, col) == (1, 1) else "v", showlegend=False), row=row, col=col)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=1)
        fig.update_xaxes(title_text="tokens", row=1, col=1)
        fig.update_xaxes(type="category", row=1, col=2)
        fig.update_xaxes(title_text="position", row=2, col=1)
        fig.update_yaxes(title_text="share of slots", row=2, col=1)
        fig.update_xaxes(title_text="expert (same layer)", type="category", row=2, col=2)
        fig.update_yaxes(title_text="N(e, j) / N(e)", row=2, col=2)
        if labels is not None:
            fig.add_hline(y=self.k / self.n_experts, line_dash="dash", line_color="gray", row=1, col=2,
                          annotation_text="uniform k/E")
        fig.add_hline(y=1 / self.n_experts, line_dash="dash", line_color="gray", row=2, col=1,
                      annotation_text="uniform 1/E")
        fig.update_layout(width=680, height=560, margin=dict(t=70))
        self.profile_figure = go.FigureWidget(fig)
        self.profile_figure.data[3].on_click(self._on_partner_click)
        self.select(layer, expert)
        linked = ipywidgets.HBox([self.coactivation, self.profile_figure],
                                 layout=ipywidgets.Layout(flex_flow="row wrap"))
        top = ipywidgets.HBox([self.heatmap, self.margin_figure]) if margins else self.heatmap
        self.children = [self.header, top, linked]

    def _margin_figure(self, threshold: float, height: int) -> go.FigureWidget:
        """One column per layer: the share of tokens with margin below `threshold` (sequential scale), the
        median margin in the hover; grey for layers without margins (hash-routed)."""
        ds = self.dataset
        if MARGIN not in ds:
            raise InputError(f"margins=True needs router_margin in {self.source}: record it with "
                               "names=['layers.*.router.margin'] (trace or run_with_cache, then analysis.from_cache)")
        if not threshold > 0:
            raise InputError(f"threshold must be a positive margin; got {threshold!r}")
        values = dims_first(ds[MARGIN].sel(layer=self.layers), "layer", "token")
        below, counted = np.zeros(len(self.layers), np.int64), np.zeros(len(self.layers), np.int64)
        for _, _, (block,) in scan_blocks(ds, [values]):
            below += (block < threshold).sum(1)
            counted += (~np.isnan(block)).sum(1)
        share = np.where(counted > 0, below / np.maximum(counted, 1), np.nan)
        median = A.margins(ds, nearest=0).median_margin.values
        self.margin_share = xr.DataArray(share, dims="layer", coords={"layer": self.layers}, name="margin_share",
                                         attrs={"threshold": threshold, "definition": "tokens with margin < "
                                                "threshold / tokens with a margin"})
        self.median_margin = xr.DataArray(median, dims="layer", coords={"layer": self.layers}, name="median_margin")
        fig = go.FigureWidget(go.Heatmap(
            z=[[None if np.isnan(v) else float(v)] for v in share], x=[f"< {threshold:g}"], y=self.layers,
            customdata=[[f"{m:.2e}"] for m in median], **colours.sequential(),
            colorbar=dict(title="share"),
            hovertemplate="layer %{y}: %{z:.4f} of tokens with margin %{x}<br>median margin %{customdata}"
                          "<extra></extra>"))
        fig.update_layout(title="near a flip", width=220, height=height, margin=dict(t=50, b=40),
                          plot_bgcolor=colours.MISSING_CSS, yaxis=dict(autorange="reversed", type="category"))
        return fig

    def _header(self, hashed: list[bool]) -> str:
        ds = self.dataset
        hash_layers = [x for x, h in zip(self.layers, hashed) if h]
        facts = [("source", self.source), ("tokens", f"{ds.sizes['token']:,}"),
                 ("layers", ", ".join(map(str, self.layers))), ("experts", str(self.n_experts)), ("k", str(self.k))]
        if hash_layers:
            facts.append(("hash-routed", ", ".join(map(str, hash_layers))))
        return " &middot; ".join(f"<b>{name}</b> {html.escape(value)}" for name, value in facts)

    def _in_context(self, ids: Sequence[int]) -> str:
        """Context ids as text with the middle token bracketed (-1: outside the sequence, dropped)."""
        mid = len(ids) // 2
        text = [("[" + self._token(i) + "]" if j == mid else self._token(i)) for j, i in enumerate(ids) if i >= 0]
        return html.escape("".join(text) if self.decode is _byte_text else " ".join(text))

    def _token(self, i: int) -> str:
        return _visible(self.decode(int(i)))

    def select(self, layer: int, expert: int) -> None:
        """Show `expert` at `layer`: the layer's co-activation (the expert's row and column boxed) and the
        expert's profile at that layer."""
        layer = _check_layer(layer, self.layers)
        expert = _check_int(expert, "expert", 0, self.n_experts - 1)
        self.selected = (layer, expert)
        E = self.n_experts
        with self.coactivation.batch_update():
            self.coactivation.data[0].z = _compact(self.coactivation_data.coactivation.sel(layer=layer).values)
            self.coactivation.layout.title = f"co-activation, layer {layer}"
            box = dict(type="rect", line=dict(color="red", width=2), xref="x", yref="y")
            self.coactivation.layout.shapes = [
                dict(box, x0=-0.5, x1=E - 0.5, y0=expert - 0.5, y1=expert + 0.5),
                dict(box, x0=expert - 0.5, x1=expert + 0.5, y0=-0.5, y1=E - 0.5)]
        p = self.profile = A.expert_profile(self.dataset, layer, expert, labels=self.labels)
        with self.profile_figure.batch_update():
            tokens, second, position, partners = self.profile_figure.data
            tokens.y = [f"{self._token(t)} ({t})" for t in p.frequent_ids.values]
            tokens.x = p.frequent_count.values.tolist()
            tokens.hovertext = [f"{n} of {m} occurrences; at position {q}: {self._in_context(c)}" for n, m, q, c in
                                zip(p.frequent_count.values, p.frequent_occurrences.values,
                                    p.frequent_position.values, p.frequent_context.values)]
            if self.labels is not None:
                second.x, second.y = [str(d) for d in p.domain.values], p.domain_share.values.tolist()
                second.hovertext = [f"{c:,} of {n:,} tokens" for c, n in zip(p.domain_count.values,
                                                                             p.domain_tokens.values)]
            else:
                second.x = [str(q) for q in p.strongest_position.values]
                second.y = p.strongest_weight.values.tolist()
                second.hovertext = [f"position {q}, weight {w:.3f}: {self._in_context(c)}" for q, w, c in
                                    zip(p.strongest_position.values, p.strongest_weight.values,
                                        p.strongest_context.values)]
            position.x, position.y = p.bin_start.values.tolist(), p.position_share.values.tolist()
            position.hovertext = [f"positions {a:,}..{b:,}" for a, b in zip(p.bin_start.values, p.bin_stop.values)]
            partners.x = [str(j) for j in p.partner_expert.values]
            partners.y = p.partner_coactivation.values.tolist()
            self.profile_figure.layout.title = (f"expert {expert}, layer {layer}: takes {p.attrs['count']:,} of "
                                                f"{p.attrs['tokens']:,} tokens ({p.attrs['share'] * E:.2f} x uniform)")

    def static_html(self) -> str:
        """The header, the load heatmap (white at the uniform share), the selected layer's co-activation and
        the selected expert's most frequent tokens."""
        layer, expert = self.selected
        load = display.routing_summary(self.load)["heatmap"]
        experts = list(range(self.n_experts))
        coact = {"title": f"co-activation, layer {layer} (row i, column j: N(i, j) / N(i))", "layers": experts,
                 "experts": experts, "baseline": None, "scale": "sequential",
                 "values": self.coactivation_data.coactivation.sel(layer=layer).values.tolist()}
        figures = "".join(f"<p><strong>{html.escape(hm['title'])}</strong><br>"
                          f"{display.img_tag(display.to_png({'heatmap': hm}), hm['title'])}</p>"
                          for hm in (load, coact))
        p = self.profile
        rows = "".join(f"<tr><td><code>{html.escape(self._token(t))}</code></td><td>{n:,}</td><td>{m:,}</td>"
                       f"<td><code>{self._in_context(c)}</code></td></tr>" for t, n, m, c in
                       zip(p.frequent_ids.values, p.frequent_count.values, p.frequent_occurrences.values,
                           p.frequent_context.values))
        return (f"<p>{self.header.value}</p>{figures}"
                f"<p>selected: layer {layer}, expert {expert}</p>"
                f"<p><strong>{html.escape(self.profile_figure.layout.title.text)}</strong></p>"
                "<table><tr><th>token</th><th>taken</th><th>occurrences</th><th>in context</th></tr>"
                f"{rows}</table>")

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.xs:
            layer = int(points.ys[0])
            self.select(layer, int(self.order[self.layers.index(layer)][int(points.xs[0])]))

    def _on_coactivation_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.xs:
            self.select(self.selected[0], int(points.xs[0]))

    def _on_partner_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.xs:
            self.select(self.selected[0], int(points.xs[0]))

    def __repr__(self) -> str:
        layer, expert = self.selected
        return (f"RoutingDashboard(source={self.source!r}, tokens={self.dataset.sizes['token']:,}, "
                f"layers={self.layers}, experts={self.n_experts}, k={self.k}, selected=(layer {layer}, "
                f"expert {expert}){', by domain' if self.labels is not None else ''})")


# ---------------------------------------------------------------- token view


class TokenView(_Snapshot, ipywidgets.VBox):
    """A window of the traced text, each token coloured by its first-choice expert at one layer; hovering a
    token shows its position, text, top-k experts, weights and (where recorded) routing margin. Reads only the
    window from the store."""

    def __init__(self, source: Source, *, layer: int | None = None, start: int = 0, length: int = 200,
                 decode: Callable[[int], str] | None = None):
        super().__init__()
        self.dataset, self.source = _open(source)
        ds = self.dataset
        if "input_ids" not in ds:
            raise ValueError(f"source {self.source} has no input_ids to show")
        self.n_tokens = ds.sizes["token"]
        layers = _layers(ds)
        layer = _pick_layer(layer, layers, A.hash_routed(ds).values.tolist())
        start = _check_int(start, "start", 0, self.n_tokens - 1)
        length = _check_int(length, "length", 1, MAX_WINDOW)
        if decode is None:
            byte_level = int(ds.input_ids.max()) < 256
            decode = _byte_text if byte_level else str
        self.decode = decode
        self.layer_picker = ipywidgets.Dropdown(options=layers, value=layer, description="layer")
        self.start_box = ipywidgets.BoundedIntText(value=start, min=0, max=self.n_tokens - 1, description="start")
        self.length_box = ipywidgets.BoundedIntText(value=length, min=1, max=MAX_WINDOW, description="length")
        self.prev_button = ipywidgets.Button(description="< prev")
        self.next_button = ipywidgets.Button(description="next >")
        self.prev_button.on_click(lambda _: self._step(-1))
        self.next_button.on_click(lambda _: self._step(1))
        for control in (self.layer_picker, self.start_box, self.length_box):
            control.observe(lambda _: self._render(), "value")
        self.text = ipywidgets.HTML()
        self.legend = ipywidgets.HTML()
        self._render()
        self.children = [ipywidgets.HBox([self.layer_picker, self.start_box, self.length_box, self.prev_button,
                                          self.next_button]),
                         self.legend, self.text]

    @property
    def layer(self) -> int:
        return self.layer_picker.value

    @property
    def start(self) -> int:
        return self.start_box.value

    @property
    def length(self) -> int:
        return self.length_box.value

    def _step(self, direction: int) -> None:
        self.start_box.value = min(max(self.start + direction * self.length, 0), self.n_tokens - 1)

    def window(self) -> xr.Dataset:
        """The shown tokens' ids, top-k experts and (where stored) weights at the chosen layer, read from the
        store for the window only (it ends at the last token)."""
        part = self.dataset.isel(token=slice(self.start, min(self.start + self.length, self.n_tokens)))
        names = [v for v in (*ROUTING_VARIABLES, "router_margin") if v in part]
        return part[names].sel(layer=self.layer).compute()

    def html(self) -> str:
        """The HTML shown for the window: one span per token, background = first-choice expert, title = routing."""
        return self.text.value

    def static_html(self) -> str:
        return self.legend.value + self.text.value

    def _tokens_html(self, win: xr.Dataset) -> str:
        ids, experts = win.input_ids.values, win.topk_ids.values
        weights = win.topk_weights.values if "topk_weights" in win else None
        spans = []
        for j, pos in enumerate(win.token.values):
            text = self.decode(int(ids[j]))
            title = f"token {pos}: {text} | experts {', '.join(str(e) for e in experts[j])}"
            if weights is not None:
                title += " | weights " + ", ".join(f"{w:.2f}" for w in weights[j])
            if "router_margin" in win and not np.isnan(win.router_margin.values[j]):
                title += f" | margin {win.router_margin.values[j]:.2e}"
            style = f"background:{_color(int(experts[j, 0]))}" if experts[j, 0] >= 0 else ""
            spans.append(f'<span style="{style}" title="{html.escape(title)}">{html.escape(text)}</span>')
        return ('<div style="font-family:monospace;white-space:pre-wrap;line-height:1.9">'
                + "".join(spans) + "</div>")

    def _legend_html(self, win: xr.Dataset) -> str:
        """The experts that are first choice somewhere in the window, most frequent first, with their colours."""
        first = win.topk_ids.values[:, 0]
        experts, counts = np.unique(first[first >= 0], return_counts=True)
        chips = [f'<span style="background:{_color(int(e))};padding:0 4px;margin-right:4px">'
                 f"expert {e}: {c}</span>" for e, c in sorted(zip(experts, counts), key=lambda x: -x[1])]
        return f"<div>first choice at layer {self.layer}: {''.join(chips)}</div>"

    def _render(self) -> None:
        win = self.window()
        self.text.value = self._tokens_html(win)
        self.legend.value = self._legend_html(win)

    def __repr__(self) -> str:
        stop = min(self.start + self.length, self.n_tokens)
        return (f"TokenView(source={self.source!r}, layer={self.layer}, tokens {self.start:,}..{stop:,} "
                f"of {self.n_tokens:,})")


# ---------------------------------------------------------------- long-context navigator


class LongContextNavigator(_Snapshot, ipywidgets.VBox):
    """Expert load along the sequence at one layer: a heatmap of each expert's share of the routing slots per
    bin of positions and the most loaded experts as lines. Zooming or panning the x axis re-aggregates the
    visible range into `bins` bins here in Python; the figure never holds more than `bins` points per series.

    `bins` is capped so that bins x experts <= MAX_CELLS (150,000) values: with 384 experts, 390 bins.
    `entropy=True` adds the routing entropy of each bin (of its load share, over ln E; 1 = balanced) as a line.
    `picks=True` adds, for DeepSeek-V4's CSA layers, how far back the indexer's picks reach
    (`analysis.pick_distances`: picks per log2 distance bin, `rate` the compression rate, by default from attrs).
    """

    def __init__(self, source: Source, *, layer: int | None = None, bins: int = 400, experts: int = 8,
                 entropy: bool = False, picks: bool = False, rate: int | None = None):
        super().__init__()
        self.dataset, self.source = _open(source)
        ds = self.dataset
        self.n_tokens, self.n_experts = ds.sizes["token"], A.expert_count(ds)
        self.bins = min(_check_int(bins, "bins", 1, 1 << 30), max(1, MAX_CELLS // self.n_experts))
        self.experts = min(_check_int(experts, "experts", 0, 1 << 30), self.n_experts)
        layers = _layers(ds)
        layer = _pick_layer(layer, layers, A.hash_routed(ds).values.tolist())
        self.layer_picker = ipywidgets.Dropdown(options=layers, value=layer, description="layer")
        self.layer_picker.observe(lambda _: self.view(*self.range), "value")
        self.reset_button = ipywidgets.Button(description="reset zoom")
        self.reset_button.on_click(lambda _: self.view(0, self.n_tokens))
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.04,
                            specs=[[{}], [{"secondary_y": entropy}]])
        fig.add_trace(go.Heatmap(colorscale="Viridis", zmin=0,
                                 colorbar=dict(title="share", len=0.6, y=1, yanchor="top"),
                                 hovertemplate="position %{x:.0f}, expert %{y}: share %{z:.4f}<extra></extra>"),
                      row=1, col=1)
        for _ in range(self.experts):
            fig.add_trace(go.Scatter(mode="lines", line_shape="hv"), row=2, col=1)
        self.entropy = entropy
        if entropy:
            fig.add_trace(go.Scatter(mode="lines", line_shape="hv", name="entropy / ln E",
                                     line=dict(color="black", dash="dot")), row=2, col=1, secondary_y=True)
            fig.update_yaxes(title_text="entropy / ln E", range=[0, 1.05], row=2, col=1, secondary_y=True)
        fig.update_layout(height=560, margin=dict(t=50), legend=dict(y=0.35, yanchor="top"))
        fig.update_yaxes(title_text="expert", row=1, col=1)
        fig.update_yaxes(title_text="share of slots", row=2, col=1)
        fig.update_xaxes(title_text="token position", row=2, col=1)
        self.figure = go.FigureWidget(fig)
        self.range = (0, self.n_tokens)
        self.view(0, self.n_tokens)
        for axis in ("xaxis", "xaxis2"):
            self.figure.layout.on_change(self._on_range, f"{axis}.range")
            self.figure.layout.on_change(self._on_autorange, f"{axis}.autorange")
        self.pick_distances = A.pick_distances(ds, rate) if picks else None
        self.pick_figure = self._pick_figure(self.pick_distances) if picks else None
        self.children = [ipywidgets.HBox([self.layer_picker, self.reset_button]), self.figure,
                         *([self.pick_figure] if picks else [])]

    @staticmethod
    def _pick_figure(dist: xr.Dataset) -> go.FigureWidget:
        """Grouped bars, one series per CSA layer: picked entries per log2 bin of distance from the query."""
        fig = go.FigureWidget()
        labels = [f"{a:,}..{b - 1:,}" for a, b in zip(dist.bin_start.values, dist.bin_stop.values)]
        for layer in dist.layer.values:
            d = dist.sel(layer=layer)
            fig.add_bar(x=labels, y=d.hist.values.tolist(), name=f"layer {layer}",
                        customdata=np.round(d.share.values, 4).tolist(),
                        hovertemplate="distance %{x}: %{y:,} picks (%{customdata:.1%})<extra>layer " + str(layer)
                                      + "</extra>")
        fig.update_layout(title=f"indexer picks by distance from the query (rate {dist.attrs['rate']})",
                          barmode="group", height=300, margin=dict(t=50),
                          xaxis=dict(title="distance in tokens (log2 bins)", type="category"),
                          yaxis_title="picks")
        return fig

    @property
    def layer(self) -> int:
        return self.layer_picker.value

    def _bounds(self, start: Any, stop: Any) -> tuple[int, int]:
        start = _check_int(start, "start", 0, self.n_tokens - 1)
        return start, _check_int(stop, "stop", start + 1, self.n_tokens)

    def aggregate(self, start: int, stop: int) -> xr.DataArray:
        """Each expert's share of the routing slots of the chosen layer in min(bins, stop - start) bins of
        positions [start, stop), as (bin, expert) with the bins' first positions in `bin_start`."""
        start, stop = self._bounds(start, stop)
        E, n = self.n_experts, stop - start
        nb = min(self.bins, n)
        ids = self.dataset.topk_ids.sel(layer=[self.layer])
        read = A.token_reader(ids, self.dataset.encoding.get("source"))
        step = max(1, BLOCK_ENTRIES // ids.sizes["k"])
        counts = np.zeros(nb * E, np.int64)
        for s in range(start, stop, step):
            e = min(s + step, stop)
            block = read(s, e)[0]  # [tokens, k]
            cell = ((np.arange(s, e) - start) * nb // n)[:, None] * E + block
            counts += np.bincount(cell[block >= 0], minlength=nb * E)
        counts = counts.reshape(nb, E)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        edges = start - (-np.arange(nb + 1) * n // nb)  # bin b holds positions with (p - start) * nb // n == b
        return xr.DataArray(share, dims=("bin", "expert"), name="share",
                            coords={"bin_start": ("bin", edges[:-1]), "bin_stop": ("bin", edges[1:]),
                                    "expert": np.arange(E)},
                            attrs={"layer": self.layer, "start": start, "stop": stop,
                                   "definition": "slots of the bin routed to the expert / slots of the bin"})

    def view(self, start: int, stop: int) -> None:
        """Show positions [start, stop), re-aggregated into at most `bins` bins (what a zoom does)."""
        share = self.aggregate(start, stop)
        start, stop = share.attrs["start"], share.attrs["stop"]
        self.range, self.shown = (start, stop), share
        edges = np.append(share.bin_start.values, stop)
        top = np.argsort(-share.values.sum(0), kind="stable")[:self.experts]
        with self.figure.batch_update():
            heat = self.figure.data[0]
            heat.x, heat.y, heat.z = edges, share.expert.values, _compact(share.values.T)
            for line, e in zip(self.figure.data[1:], top):
                line.x, line.y = share.bin_start.values, share.values[:, e].astype(np.float32)
                line.name, line.line.color = f"expert {e}", _color(int(e))
            if self.entropy:
                self.figure.data[-1].x, self.figure.data[-1].y = share.bin_start.values, bin_entropy(share.values)
            self.figure.layout.title = (f"expert load along the sequence, layer {self.layer}: tokens "
                                        f"{start:,}..{stop:,} in {share.sizes['bin']} bins")
            self.figure.layout.xaxis.range = self.figure.layout.xaxis2.range = (start, stop)

    def static_html(self) -> str:
        """The heatmap shown (experts down, position bins across) as a PNG, white at the uniform share 1/E."""
        share = self.shown
        heatmap = {"title": self.figure.layout.title.text, "layers": share.expert.values.tolist(),
                   "experts": [_position(int(b)) for b in share.bin_start.values],
                   "values": share.values.T.tolist(), "baseline": 1 / self.n_experts}
        return (f"<strong>{html.escape(heatmap['title'])}</strong><br>"
                + display.img_tag(display.to_png({"heatmap": heatmap}), heatmap["title"]))

    def _on_range(self, layout: Any, xrange: Any) -> None:
        if xrange is None:
            return
        start = min(max(math.floor(xrange[0]), 0), self.n_tokens - 1)
        stop = min(max(math.ceil(xrange[1]), start + 1), self.n_tokens)
        if (start, stop) != self.range:
            self.view(start, stop)

    def _on_autorange(self, layout: Any, autorange: Any) -> None:
        if autorange is True and self.range != (0, self.n_tokens):
            self.view(0, self.n_tokens)

    def __repr__(self) -> str:
        start, stop = self.range
        return (f"LongContextNavigator(source={self.source!r}, layer={self.layer}, tokens {start:,}..{stop:,} "
                f"of {self.n_tokens:,}, bins={self.bins}, experts={self.n_experts})")


def bin_entropy(share: np.ndarray) -> np.ndarray:
    """Normalised entropy of each row of load shares [bins, E] (1 = every expert equally loaded), as
    `analysis.by_position` defines it; NaN for an empty bin."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(share > 0, share * np.log(share), 0.0).sum(-1) / math.log(share.shape[-1])
    return np.where(share.sum(-1) > 0, h, np.nan).astype(np.float32)


# ---------------------------------------------------------------- intervention panel


class InterventionPanel(_Snapshot, ipywidgets.VBox):
    """Ablate or force experts at one layer, or steer its residual stream, for a prompt and compare with the
    unchanged model: the next-token predictions (top tokens before and after, the largest logit changes, whether
    the argmax moved) and greedy continuations side by side. `vectors` names steering vectors ([hidden]) to
    pick from; steering adds `scale * vector` to `layers.{layer}.resid_post` at every token."""

    def __init__(self, model: Any, prompt: str | Sequence[int] | torch.Tensor, *, layer: int | None = None,
                 tokenizer: Any = None, top: int = 10, vectors: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.top = _check_int(top, "top", 1, 1 << 20)
        self.ids = self._encode(prompt)
        self.vectors = dict(vectors or {})
        self.baselines: dict[int, list[int]] = {}  # max_new_tokens -> the unchanged greedy continuation
        self.generation: dict[str, Any] | None = None
        self.routers = {int(i): m for i, block in model.layers.items() for m in block.modules()
                        if isinstance(m, Router)}
        if not self.routers:
            raise ValueError("model has no MoE layer to intervene on")
        layers = sorted(self.routers)
        layer = _pick_layer(layer, layers, [])
        logits, cache = model.run_with_cache(self.ids, names=[f"layers.*.{ROUTER_TOPK_IDS}"])
        self.logits = logits[0, -1].float()
        self.routing = {x: cache[f"layers.{x}.{ROUTER_TOPK_IDS}"][0, -1].tolist() for x in layers}
        self.result: dict[str, Any] | None = None
        self.layer_picker = ipywidgets.Dropdown(options=layers, value=layer, description="layer")
        self.expert_picker = ipywidgets.SelectMultiple(description="experts", rows=8)
        modes = ["ablate", "force", *(["steer"] if self.vectors else [])]
        self.mode_picker = ipywidgets.ToggleButtons(options=modes, value="ablate")
        self.vector_picker = ipywidgets.Dropdown(options=list(self.vectors), description="vector")
        self.scale_box = ipywidgets.FloatText(value=1.0, description="scale")
        self.run_button = ipywidgets.Button(description="run", button_style="primary")
        self.run_button.on_click(lambda _: self._clicked(self._run_args))
        self.new_tokens = ipywidgets.BoundedIntText(value=20, min=1, max=4096, description="new tokens")
        self.generate_button = ipywidgets.Button(description="generate")
        self.generate_button.on_click(lambda _: self._clicked(self._generate_args))
        self.info = ipywidgets.HTML()
        self.output = ipywidgets.HTML()
        self.continuations = ipywidgets.HTML()
        self.layer_picker.observe(lambda _: self._layer_changed(), "value")
        self._layer_changed()
        steering = [self.vector_picker, self.scale_box] if self.vectors else []
        self.children = [ipywidgets.HBox([self.layer_picker, self.expert_picker,
                                          ipywidgets.VBox([self.mode_picker, *steering, self.run_button]),
                                          ipywidgets.VBox([self.new_tokens, self.generate_button])]),
                         self.info, self.output, self.continuations]

    def _encode(self, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The prompt as ids [1, T]: text through the tokenizer, or token ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer; pass tokenizer= or token ids")
            prompt = self.tokenizer.encode(prompt)
        ids = torch.as_tensor(prompt, dtype=torch.long)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or len(ids) == 0:
            raise ValueError(f"prompt must be text or one non-empty sequence of token ids, got shape "
                             f"{list(ids.shape)}")
        return ids[None]

    def _text(self, token: int) -> str:
        text = self.tokenizer.decode([token]) if self.tokenizer is not None else ""
        return _visible(text) if text and text != "\ufffd" else f"<{token}>"

    def _top(self, logits: torch.Tensor) -> list[tuple[str, int, float]]:
        p = logits.softmax(-1)
        values, ids = p.topk(min(self.top, len(p)))
        return [(self._text(int(i)), int(i), float(v)) for v, i in zip(values, ids)]

    def intervention(self, layer: int, experts: Sequence[int], mode: str, vector: Any = None,
                     scale: float = 1.0) -> tuple[int, list[int], list]:
        """(layer, experts, hooks) of an intervention, checked: `experts` ablated (their weights zeroed) or
        forced (one id per routing slot) at `layer` for every token, or `scale * vector` (a tensor, or a name
        in `vectors`) added to `layers.{layer}.resid_post` ("steer")."""
        layer = _check_layer(layer, sorted(self.routers))
        spec = self.routers[layer].spec
        experts = [_check_int(e, "experts", 0, spec.experts - 1) for e in experts]
        if mode == "ablate":
            if not experts:
                raise ValueError("experts is empty: pick at least one expert to ablate")
            return layer, experts, ablate(layer, experts)
        if mode == "force":
            if len(experts) != spec.top_k:
                raise ValueError(f"experts: forcing needs exactly k={spec.top_k} experts, got {len(experts)}")
            return layer, experts, force(layer, experts)
        if mode == "steer":
            if isinstance(vector, str):
                if vector not in self.vectors:
                    raise ValueError(f"vector {vector!r} is not one of the panel's vectors {list(self.vectors)}")
                vector = self.vectors[vector]
            if vector is None:
                raise ValueError("steering needs a vector: pass vector= (a tensor [hidden] or a name in vectors)")
            return layer, [], steer(f"layers.{layer}.resid_post", vector, scale)
        raise ValueError(f"mode must be 'ablate', 'force' or 'steer', got {mode!r}")

    def run(self, layer: int, experts: Sequence[int] = (), mode: str = "ablate", *, vector: Any = None,
            scale: float = 1.0) -> dict[str, Any]:
        """The prompt's next-token prediction under `intervention(layer, experts, mode, vector, scale)` against
        the unchanged forward: top tokens before and after as (text, id, probability), the largest logit
        changes as (text, id, before, after, delta)."""
        layer, experts, hooks = self.intervention(layer, experts, mode, vector, scale)
        with torch.no_grad(), self.model.hooks(hooks):
            after = self.model(self.ids)[0, -1].float()
        delta = after - self.logits
        moved = delta.abs().topk(min(self.top, len(delta))).indices
        self.result = {
            "layer": layer, "experts": experts, "mode": mode,
            "baseline": self._top(self.logits), "intervened": self._top(after),
            "logit_delta": [(self._text(int(i)), int(i), float(self.logits[i]), float(after[i]), float(delta[i]))
                            for i in moved],
            "changed": int(after.argmax()) != int(self.logits.argmax()),
        }
        self.output.value = self.table_html(self.result)
        return self.result

    def generate(self, layer: int, experts: Sequence[int] = (), mode: str = "ablate", max_new_tokens: int = 20, *,
                 vector: Any = None, scale: float = 1.0) -> dict[str, Any]:
        """Greedy continuations of the prompt by `max_new_tokens` tokens, unchanged and under
        `intervention(layer, experts, mode, vector, scale)` (at the prompt and every new token): their ids and
        texts, and the first new token where they part (None: they agree)."""
        layer, experts, hooks = self.intervention(layer, experts, mode, vector, scale)
        n = _check_int(max_new_tokens, "max_new_tokens", 1, 1 << 20)
        if n not in self.baselines:
            self.baselines[n] = self.model.generate(self.ids, n, progress=False)[0, self.ids.shape[1]:].tolist()
        with self.model.hooks(hooks):
            after = self.model.generate(self.ids, n, progress=False)[0, self.ids.shape[1]:].tolist()
        base = self.baselines[n]
        self.generation = {
            "layer": layer, "experts": experts, "mode": mode, "max_new_tokens": n,
            "prompt": self._decode(self.ids[0].tolist()),
            "baseline_ids": base, "intervened_ids": after,
            "baseline": self._decode(base), "intervened": self._decode(after),
            "diverged_at": next((i for i, (a, b) in enumerate(zip(base, after)) if a != b), None),
        }
        if mode == "steer":
            self.generation["scale"] = float(scale)
        self.continuations.value = self.continuation_html(self.generation)
        return self.generation

    def _decode(self, ids: list[int]) -> str:
        """Token ids as text (each token's own text without a tokenizer)."""
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return "".join(self._text(i) for i in ids)

    def _layer_changed(self) -> None:
        layer = self.layer_picker.value
        self.expert_picker.options = list(range(self.routers[layer].spec.experts))
        routed = self.routing[layer]
        self.expert_picker.value = routed[:1]
        self.info.value = (f"the prompt's last token is routed to experts {', '.join(map(str, routed))} at layer "
                           f"{layer}; forcing takes k={len(routed)} experts")

    def _run_args(self) -> None:
        self.run(self.layer_picker.value, list(self.expert_picker.value), self.mode_picker.value,
                 vector=self.vector_picker.value, scale=self.scale_box.value)

    def _generate_args(self) -> None:
        self.generate(self.layer_picker.value, list(self.expert_picker.value), self.mode_picker.value,
                      self.new_tokens.value, vector=self.vector_picker.value, scale=self.scale_box.value)

    def _clicked(self, action: Callable[[], None]) -> None:
        try:
            action()
        except ValueError as e:
            self.output.value = f"<b>cannot run</b>: {html.escape(str(e))}"

    def static_html(self) -> str:
        return f"<p>{self.info.value}</p>{self.output.value}{self.continuations.value}"

    @staticmethod
    def continuation_html(result: dict[str, Any]) -> str:
        """A `generate` result as HTML: the prompt, then both continuations side by side, where they part marked."""
        what = (f"steer layer {result['layer']} (scale {result['scale']:g})" if result["mode"] == "steer" else
                f"{result['mode']} experts {', '.join(map(str, result['experts']))} at layer {result['layer']}")
        at = result["diverged_at"]
        verdict = "identical continuations" if at is None else f"continuations part at new token {at + 1}"

        def column(title: str, text: str) -> str:
            return (f"<div style='flex:1'><b>{html.escape(title)}</b><pre style='white-space:pre-wrap'>"
                    f"{html.escape(text)}</pre></div>")

        return (f"<p>{html.escape(what)}, {result['max_new_tokens']} new tokens: <b>{verdict}</b></p>"
                f"<p>prompt: <code>{html.escape(_visible(result['prompt']))}</code></p>"
                "<div style='display:flex;gap:2em'>" + column("baseline", result["baseline"])
                + column(what, result["intervened"]) + "</div>")

    @staticmethod
    def table_html(result: dict[str, Any]) -> str:
        """A `run` result as HTML: top tokens before and after side by side, then the largest logit changes."""
        def cell(text: str) -> str:
            return f"<td><code>{html.escape(text)}</code></td>"

        rows = "".join(
            f"<tr><td>{i + 1}</td>{cell(b[0])}<td>{b[2]:.3f}</td>{cell(a[0])}<td>{a[2]:.3f}</td></tr>"
            for i, (b, a) in enumerate(zip(result["baseline"], result["intervened"])))
        changes = "".join(f"<tr>{cell(t)}<td>{before:.3f}</td><td>{after:.3f}</td><td>{d:+.3f}</td></tr>"
                          for t, _, before, after, d in result["logit_delta"])
        verdict = (f"argmax changed: {html.escape(result['baseline'][0][0])} -> "
                   f"{html.escape(result['intervened'][0][0])}" if result["changed"] else "argmax unchanged")
        experts = ", ".join(map(str, result["experts"]))
        what = "steer" if result["mode"] == "steer" else f"{result['mode']} experts {experts}"
        return (f"<p>{what} at layer {result['layer']}: "
                f"<b>{verdict}</b></p><div style='display:flex;gap:2em'>"
                "<table><tr><th>#</th><th>before</th><th>p</th><th>after</th><th>p</th></tr>" + rows + "</table>"
                "<table><tr><th>token</th><th>logit before</th><th>after</th><th>change</th></tr>"
                + changes + "</table></div>")

    def __repr__(self) -> str:
        source = getattr(self.model, "source", None) or type(self.model).__name__
        return (f"InterventionPanel(model={source!r}, prompt={self.ids.shape[1]} tokens, "
                f"layers={sorted(self.routers)}, top={self.top})")
