"""The routing dashboard: expert load per layer, the selected layer's co-activation and the selected
expert's profile."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from .. import analysis as A
from .. import colours, display
from ..analysis.dataset import dims_first
from ..analysis.fragility import MARGIN
from ..analysis.scan import scan_blocks
from ..errors import InputError
from .common import (
    byte_text, check_int, check_layer, compact_matrix, open_source, pick_layer, routed_layers, Snapshot, Source
)
from .profile import ExpertProfile


class RoutingDashboard(Snapshot, ipywidgets.VBox):
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
        self.dataset, self.source = open_source(source)
        ds = self.dataset
        self.layers, self.n_experts, self.k = routed_layers(ds), A.expert_count(ds), ds.sizes["k"]
        self.labels, self.sort = labels, sort
        self.decode = decode or (byte_text if "input_ids" in ds and int(ds.input_ids.max()) < 256 else str)
        self.load = A.expert_load(ds)
        self.coactivation_data = A.coactivation(ds)
        share = self.load.share.values
        # order[i]: layer i's experts as drawn left to right
        self.order = (np.argsort(-share, axis=1, kind="stable") if sort == "load"
                      else np.tile(np.arange(self.n_experts), (len(self.layers), 1)))
        hashed = self.load.hash_routed.values.tolist()
        layer = pick_layer(layer, self.layers, hashed)
        if expert is None:
            expert = int(self.load.share.sel(layer=layer).argmax("expert"))
        self.header = ipywidgets.HTML(self._header(hashed))
        rows = np.arange(len(self.layers))[:, None]
        relative = self.load.relative_load.values
        self.heatmap = go.FigureWidget(go.Heatmap(
            z=compact_matrix(share[rows, self.order]), x=list(range(self.n_experts)), y=self.layers,
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
        self.profile_view = ExpertProfile(ds, layer, expert, labels=labels, decode=self.decode)
        self.profile_view.picked = self.select  # a partner's bar selects it here too
        self.select(layer, expert)
        linked = ipywidgets.HBox([self.coactivation, self.profile_view],
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

    def select(self, layer: int, expert: int) -> None:
        """Show `expert` at `layer`: the layer's co-activation (the expert's row and column boxed) and the
        expert's profile at that layer."""
        layer = check_layer(layer, self.layers)
        expert = check_int(expert, "expert", 0, self.n_experts - 1)
        self.selected = (layer, expert)
        E = self.n_experts
        with self.coactivation.batch_update():
            self.coactivation.data[0].z = compact_matrix(self.coactivation_data.coactivation.sel(layer=layer).values)
            self.coactivation.layout.title = f"co-activation, layer {layer}"
            box = dict(type="rect", line=dict(color="red", width=2), xref="x", yref="y")
            self.coactivation.layout.shapes = [
                dict(box, x0=-0.5, x1=E - 0.5, y0=expert - 0.5, y1=expert + 0.5),
                dict(box, x0=expert - 0.5, x1=expert + 0.5, y0=-0.5, y1=E - 0.5)]
        if self.profile_view.selected != (layer, expert):
            self.profile_view.select(layer, expert)

    @property
    def profile(self) -> xr.Dataset:
        """The selected expert's profile (`profile_view.profile`)."""
        return self.profile_view.profile

    @property
    def profile_figure(self) -> go.FigureWidget:
        return self.profile_view.profile_figure

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
        return (f"<p>{self.header.value}</p>{figures}"
                f"<p>selected: layer {layer}, expert {expert}</p>"
                f"<p><strong>{html.escape(self.profile_figure.layout.title.text)}</strong></p>"
                f"{self.profile_view.tokens_html()}")

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
