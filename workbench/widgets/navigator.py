"""The long-context navigator: expert load along the sequence, re-binned on the server as you zoom."""

from __future__ import annotations

import html
import math
from typing import Any

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from .. import analysis as A
from .. import colours, display
from .common import (
    check_int, compact_matrix, expert_colour, MAX_CELLS, open_source, pick_layer, position_label, routed_layers,
    Snapshot, Source
)
from .figure import FigureWidget
from .profile import ExpertProfile

BLOCK_ENTRIES = 1 << 20  # routing entries (tokens x k) read per block


class LongContextNavigator(Snapshot, ipywidgets.VBox):
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
        self.dataset, self.source = open_source(source)
        ds = self.dataset
        self.n_tokens, self.n_experts = ds.sizes["token"], A.expert_count(ds)
        self.bins = min(check_int(bins, "bins", 1, 1 << 30), max(1, MAX_CELLS // self.n_experts))
        self.experts = min(check_int(experts, "experts", 0, 1 << 30), self.n_experts)
        layers = routed_layers(ds)
        layer = pick_layer(layer, layers, A.hash_routed(ds).values.tolist())
        self.layer_picker = ipywidgets.Dropdown(options=layers, value=layer, description="layer")
        self.layer_picker.observe(lambda _: self.view(*self.range), "value")
        self.reset_button = ipywidgets.Button(description="reset zoom")
        self.reset_button.on_click(lambda _: self.view(0, self.n_tokens))
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.04,
                            specs=[[{}], [{"secondary_y": entropy}]])
        fig.add_trace(go.Heatmap(**colours.diverging(1 / self.n_experts),
                                 colorbar=dict(title="share<br>(white: 1/E)", len=0.6, y=1, yanchor="top"),
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
        self.figure = FigureWidget(fig)
        self.figure.data[0].on_click(self._on_heatmap_click)
        self.profile: ExpertProfile | None = None
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
    def _pick_figure(dist: xr.Dataset) -> FigureWidget:
        """Grouped bars, one series per CSA layer: picked entries per log2 bin of distance from the query."""
        fig = FigureWidget()
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

    def open_profile(self, expert: int) -> ExpertProfile:
        """Show, below the figures, the profile of `expert` at the shown layer (what clicking a heatmap row does)."""
        expert = check_int(expert, "expert", 0, self.n_experts - 1)
        if "input_ids" not in self.dataset:
            raise ValueError(f"source {self.source} has no input_ids: an expert profile shows the tokens it takes")
        if self.profile is None:
            self.profile = ExpertProfile(self.dataset, self.layer, expert)
            self.children = [*self.children, self.profile]
        else:
            self.profile.select(self.layer, expert)
        return self.profile

    @property
    def layer(self) -> int:
        return self.layer_picker.value

    def _bounds(self, start: Any, stop: Any) -> tuple[int, int]:
        start = check_int(start, "start", 0, self.n_tokens - 1)
        return start, check_int(stop, "stop", start + 1, self.n_tokens)

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
            heat.x, heat.y, heat.z = edges, share.expert.values, compact_matrix(share.values.T)
            for line, e in zip(self.figure.data[1:], top):
                line.x, line.y = share.bin_start.values, share.values[:, e].astype(np.float32)
                line.name, line.line.color = f"expert {e}", expert_colour(int(e))
            if self.entropy:
                self.figure.data[-1].x, self.figure.data[-1].y = share.bin_start.values, bin_entropy(share.values)
            self.figure.layout.title = (f"expert load along the sequence, layer {self.layer}: tokens "
                                        f"{start:,}..{stop:,} in {share.sizes['bin']} bins")
            self.figure.layout.xaxis.range = self.figure.layout.xaxis2.range = (start, stop)

    def static_html(self) -> str:
        """The heatmap shown (experts down, position bins across) as a PNG, white at the uniform share 1/E."""
        share = self.shown
        heatmap = {"title": self.figure.layout.title.text, "layers": share.expert.values.tolist(),
                   "experts": [position_label(int(b)) for b in share.bin_start.values],
                   "values": share.values.T.tolist(), "baseline": 1 / self.n_experts}
        return (f"<strong>{html.escape(heatmap['title'])}</strong><br>"
                + display.img_tag(display.to_png({"heatmap": heatmap}), heatmap["title"]))

    def _on_heatmap_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.ys and "input_ids" in self.dataset:
            self.open_profile(int(points.ys[0]))

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
