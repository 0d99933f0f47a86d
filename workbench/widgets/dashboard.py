"""The routing dashboard: expert load per layer, the selected layer's co-activation and the selected
expert's profile."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Sequence
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
from .figure import FigureWidget
from .profile import ExpertProfile

SORTS = ("id", "load", "similarity")
MAX_COLUMNS = 128  # columns the load heatmap sends at most; beyond, each column is a bin of adjacent experts
ORDER_TITLES = {"id": "expert", "load": "rank by load within the layer",
                "similarity": "position in the layer's similarity order"}
BINNED_HOVER = ("layer %{y}, positions %{customdata[3]}..%{customdata[4]}<br>mean share of the layer's slots "
                "%{z:.4f}<br>busiest: expert %{customdata[0]}, share %{customdata[2]:.4f} "
                "(%{customdata[1]:.2f} x uniform; a click selects it)<extra></extra>")
FULL_HOVER = ("layer %{y}, expert %{customdata[0]}<br>share of the layer's slots %{z:.4f}<br>"
              "%{customdata[1]:.2f} x uniform (k/E of the tokens)<extra></extra>")


class RoutingDashboard(Snapshot, ipywidgets.VBox):
    """Expert load per layer on the diverging scale around the uniform share 1/E (click a cell to select a
    layer and expert), the selected layer's co-activation matrix and the selected expert's profile at that
    layer (`analysis.expert_profile`): the tokens it takes most often in context, its share of each domain's
    tokens (`labels`: one domain per token) or else its highest-weight tokens, its load along position and its
    co-activation partners. Expert ids are local to a layer, so no figure puts one id across layers.

    `sort="load"` orders each layer's experts by load, `sort="similarity"` puts experts with similar
    co-activation rows side by side (`similarity_order`); the x axis is then the position within the layer and
    the hover names the expert; the `sort` dropdown changes it live. Beyond MAX_COLUMNS experts a column is a
    bin of adjacent ones (mean share; hover and click: its busiest expert); zooming or panning the x axis
    re-bins the visible columns here in Python, down to single experts. The `search` box (`search`) selects
    "layer 12", "12/19", "expert 19" or the expert that takes a token most often. `compact=True` draws thin
    rows for long lists of layers (DeepSeek-V4's 43-61), labelled every few layers.
    `decode` maps a token id to text (bytes as text for a byte-level vocabulary, else the id).
    `margins=True` adds, beside the load, each layer's share of tokens whose routing margin (`router_margin`)
    is below `threshold` (near a flip), with the median margin in the hover."""

    def __init__(self, source: Source, *, labels: Any = None, layer: int | None = None,
                 expert: int | None = None, sort: str = "id", compact: bool = False,
                 decode: Callable[[int], str] | None = None, margins: bool = False, threshold: float = 1e-3):
        super().__init__()
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, got {sort!r}")
        self.dataset, self.source = open_source(source)
        ds = self.dataset
        self.layers, self.n_experts, self.k = routed_layers(ds), A.expert_count(ds), ds.sizes["k"]
        self.labels, self.sort = labels, sort
        self.decode = decode or (byte_text if "input_ids" in ds and int(ds.input_ids.max()) < 256 else str)
        self.load = A.expert_load(ds)
        self.coactivation_data = A.coactivation(ds)
        self._orders: dict[str, np.ndarray] = {}
        self._texts: dict[str, list[int]] | None = None
        hashed = self.load.hash_routed.values.tolist()
        layer = pick_layer(layer, self.layers, hashed)
        if expert is None:
            expert = int(self.load.share.sel(layer=layer).argmax("expert"))
        self.header = ipywidgets.HTML(self._header(hashed))
        self.heatmap = FigureWidget(go.Heatmap(
            y=self.layers, **colours.diverging(1 / self.n_experts), colorbar=dict(title="share<br>(white: 1/E)")))
        row_height = 8 if compact else 28
        every = math.ceil(len(self.layers) / 16) if compact else 1  # at most 16 layer labels on thin rows
        self.heatmap.update_layout(
            height=120 + row_height * len(self.layers), margin=dict(t=50, b=40),
            yaxis=dict(title="layer", autorange="reversed",  # first layer on top, as the renderer draws
                       tickmode="array", tickvals=self.layers[::every]))
        self.heatmap.data[0].on_click(self._on_click)
        self.sort_picker = ipywidgets.Dropdown(options=SORTS, value=sort, description="sort")
        self.sort_picker.add_class("mwb-sort")
        self.sort_picker.observe(lambda change: change["new"] != self.sort and self.sort_by(change["new"]), "value")
        self.search_box = ipywidgets.Text(description="search", continuous_update=False,
                                          placeholder="layer 12, 12/19, expert 19 or a token")
        self.search_box.add_class("mwb-search")
        self.search_result = ipywidgets.HTML()
        self.search_result.add_class("mwb-search-result")
        self.search_box.observe(self._on_search, "value")
        self.sort_by(sort)
        self.heatmap.layout.on_change(self._on_range, "xaxis.range")
        self.heatmap.layout.on_change(self._on_autorange, "xaxis.autorange")
        self.margin_figure = self._margin_figure(threshold, self.heatmap.layout.height) if margins else None
        self.coactivation = FigureWidget(go.Heatmap(
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
        top = ipywidgets.VBox([ipywidgets.HBox([self.sort_picker, self.search_box, self.search_result]),
                               ipywidgets.HBox([self.heatmap, self.margin_figure]) if margins else self.heatmap])
        self.children = [self.header, top, linked]

    def _margin_figure(self, threshold: float, height: int) -> FigureWidget:
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
        fig = FigureWidget(go.Heatmap(
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
                 ("layers", runs_text(self.layers)), ("experts", str(self.n_experts)), ("k", str(self.k))]
        if hash_layers:
            facts.append(("hash-routed", runs_text(hash_layers)))
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
    def profile_figure(self) -> FigureWidget:
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
            self.select(*self.cell_expert(points.xs[0], points.ys[0]))

    def cell_expert(self, x: float, y: float) -> tuple[int, int]:
        """(layer, expert) of the heatmap cell at (x, y): the expert drawn there, or a bin's busiest."""
        column = int(np.searchsorted(self.edges, x + 0.5, side="right")) - 1
        column = min(max(column, 0), len(self.edges) - 2)
        return int(y), int(self.shown_expert[self.layers.index(int(y)), column])

    # ---------------------------------------------------------------- sorting and zoom

    def _order(self, sort: str) -> np.ndarray:
        """[layers, experts]: each layer's experts as drawn left to right under `sort` (computed once)."""
        if sort not in self._orders:
            share = self.load.share.values
            self._orders[sort] = (np.argsort(-share, axis=1, kind="stable") if sort == "load" else
                                  similarity_order(self.coactivation_data.pairs.values,
                                                   self.coactivation_data.counts.values) if sort == "similarity" else
                                  np.tile(np.arange(self.n_experts), (len(self.layers), 1)))
        return self._orders[sort]

    def sort_by(self, sort: str) -> None:
        """Order each layer's experts by id, load (busiest first) or similarity, and show every column."""
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {SORTS}, got {sort!r}")
        self.sort, self.order = sort, self._order(sort)  # order[i]: layer i's experts as drawn left to right
        self.sort_picker.value = sort
        self.view(0, self.n_experts)

    def view(self, start: int, stop: int) -> None:
        """Show the drawn columns [start, stop) of every layer: each column as it is when at most MAX_COLUMNS,
        else MAX_COLUMNS bins of adjacent columns with their mean share (what a zoom does)."""
        E = self.n_experts
        start = check_int(start, "start", 0, E - 1)
        stop = check_int(stop, "stop", start + 1, E)
        n = stop - start
        nb = min(MAX_COLUMNS, n)
        edges = start - (-np.arange(nb + 1) * n // nb)  # bin b holds columns c with (c - start) * nb // n == b
        rows = np.arange(len(self.layers))[:, None]
        drawn = self.load.share.values[rows, self.order[:, start:stop]]
        mean = np.add.reduceat(drawn, edges[:-1] - start, axis=1) / np.diff(edges)
        busiest = np.stack([drawn[:, a:b].argmax(1) for a, b in zip(edges[:-1] - start, edges[1:] - start)], 1)
        busiest += edges[:-1] - start
        expert = self.order[rows, busiest + start]
        self.range, self.edges, self.shown_expert = (start, stop), edges, expert
        first = np.broadcast_to(edges[:-1], expert.shape)
        custom = np.stack([expert, np.round(self.load.relative_load.values[rows, expert], 2),
                           np.round(drawn[rows, busiest], 5), first, np.broadcast_to(edges[1:] - 1, expert.shape)],
                          -1)
        sorted_by = {"id": "", "load": " (experts sorted by load within each layer)",
                     "similarity": " (experts ordered by co-activation similarity within each layer)"}[self.sort]
        zoom = "" if n == E else f", positions {start}..{stop - 1} of {E}"
        with self.heatmap.batch_update():
            heat = self.heatmap.data[0]
            heat.x, heat.z = (edges - 0.5).tolist(), compact_matrix(mean)
            heat.customdata = [[[int(e), r, s, int(a), int(b)] for e, r, s, a, b in row] for row in custom.tolist()]
            heat.hovertemplate = BINNED_HOVER if nb < n else FULL_HOVER
            self.heatmap.layout.title = (f"expert load{sorted_by}{zoom}" +
                                         (f" in {nb} bins (zoom in for single experts)" if nb < n else ""))
            self.heatmap.layout.xaxis.title = ORDER_TITLES[self.sort]
            self.heatmap.layout.xaxis.range = (start - 0.5, stop - 0.5)

    def _on_range(self, layout: Any, xrange: Any) -> None:
        if xrange is None:
            return
        start = min(max(math.floor(xrange[0] + 0.5), 0), self.n_experts - 1)
        stop = min(max(math.ceil(xrange[1] + 0.5), start + 1), self.n_experts)
        if (start, stop) != self.range:
            self.view(start, stop)

    def _on_autorange(self, layout: Any, autorange: Any) -> None:
        if autorange is True and self.range != (0, self.n_experts):
            self.view(0, self.n_experts)

    # ---------------------------------------------------------------- search

    def search(self, query: str) -> str:
        """Select what `query` names and say what was found: "layer 12" or "L12" (its busiest expert), "12/19"
        or "layer 12 expert 19", "expert 19" (at the selected layer), else a token's text (at the selected
        layer, the expert that takes it most often)."""
        q = query.strip()
        both = (re.fullmatch(r"(?:(?:l|layer)\s*)?(\d+)\s*/\s*(\d+)", q, re.I)
                or re.fullmatch(r"(?:l|layer)\s*(\d+)\s*,?\s*(?:e|expert)\s*(\d+)", q, re.I))
        layer_only = re.fullmatch(r"(?:l|layer)\s*(\d+)", q, re.I)
        expert_only = re.fullmatch(r"(?:e|expert)\s*(\d+)", q, re.I)
        layer = int((both or layer_only).group(1)) if both or layer_only else self.selected[0]
        if layer not in self.layers:
            return f"layer {layer} is not a routed layer (routed: {runs_text(self.layers)})"
        row = self.layers.index(layer)
        if layer_only:
            expert = int(self.load.share.values[row].argmax())
            self.select(layer, expert)
            return f"layer {layer}: its busiest expert {expert} ({self.load.share.values[row, expert]:.2%} of slots)"
        if both or expert_only:
            expert = int((both or expert_only).group(2 if both else 1))
            if not expert < self.n_experts:
                return f"expert {expert} does not exist: experts are 0..{self.n_experts - 1}"
            self.select(layer, expert)
            return f"layer {layer}, expert {expert}"
        return self._search_token(query, row)

    def _search_token(self, query: str, row: int) -> str:
        """Select, at layer `row`, the expert that takes the token reading `query` (else stripped) most often."""
        if self._texts is None:  # text -> the ids present in the source that decode to it
            self._texts = {}
            for i in np.unique(self.dataset.input_ids.values).tolist():
                self._texts.setdefault(self.decode(i), []).append(i)
        text = query if query in self._texts else query.strip()
        ids = self._texts.get(text)
        if not ids:
            return f"no token of the {len(self.dataset.input_ids):,} reads {text!r}; try layer 12, 12/19 or expert 19"
        counts, occurrences = self.token_counts(ids)
        layer, taken = self.layers[row], counts[row]
        named = f"token {text!r} (id{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}, {occurrences:,} times)"
        if not taken.any():
            return f"{named}: no expert takes it at layer {layer}"
        top = np.argsort(-taken, kind="stable")[:3]
        self.select(layer, int(top[0]))
        return (f"{named}: at layer {layer} taken most by expert "
                + ", ".join(f"{e} ({taken[e]:,})" for e in top if taken[e]))

    def token_counts(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """([layers, experts] how often each expert takes a token whose input id is in `ids`, occurrences)."""
        ds, L, E = self.dataset, len(self.layers), self.n_experts
        counts, occurrences = np.zeros(L * E, np.int64), 0
        for _, _, (routing, inputs) in scan_blocks(ds, [ds.topk_ids, ds.input_ids]):
            hit = np.isin(inputs, ids)
            occurrences += int(hit.sum())
            chosen = routing[:, hit]
            cell = np.arange(L)[:, None, None] * E + chosen
            counts += np.bincount(cell[chosen >= 0], minlength=L * E)
        return counts.reshape(L, E), occurrences

    def _on_search(self, change: Any) -> None:
        if change["new"]:
            try:
                found = self.search(change["new"])
            except Exception as e:  # the result line says what went wrong; the UI callback never raises
                found = f"search failed: {type(e).__name__}: {e}"
            self.search_result.value = html.escape(found)

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


def similarity_order(pairs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[layers, experts] orders from co-activation pairs N(i, j) [layers, E, E] and counts N(i) [layers, E]: per
    layer a chain from the busiest expert, each next the unplaced expert whose co-activation row (N(i) on the
    diagonal) is nearest in cosine to the last placed one's (ties: the lowest id), so similar experts sit together."""
    L, E = counts.shape
    order = np.empty((L, E), np.int64)
    for i in range(L):
        rows = pairs[i] + np.diag(counts[i]).astype(np.float64)
        unit = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
        similar = unit @ unit.T
        placed = np.zeros(E, bool)
        current = int(counts[i].argmax())
        for j in range(E):
            order[i, j], placed[current] = current, True
            current = int(np.where(placed, -np.inf, similar[current]).argmax())
    return order


def runs_text(values: Sequence[int]) -> str:
    """Integers as comma-separated runs: [0, 1, 2, 3, 7, 9, 10] -> "0..3, 7, 9, 10" (runs of three or more)."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out += [f"{values[i]}..{values[j]}"] if j - i >= 2 else [str(v) for v in values[i:j + 1]]
        i = j + 1
    return ", ".join(out)
