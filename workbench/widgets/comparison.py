"""The comparison view: two routings of the same tokens (two stores, a store against an engine dump, fp32
against bf16) side by side, per layer and token by token, built on `analysis.compare`."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from .. import analysis as A
from .. import colours
from ..analysis.compare import NEVER
from .common import (
    byte_text, check_int, check_layer, MAX_WINDOW, open_source, routed_layers, Snapshot, Source, TokenWindow
)
from .figure import FigureWidget

SAME = "#ffffff"  # background of a token routed alike (at every layer, or at the selected one)
MAX_DIVERGING = 1_000_000  # the most positions `diverging_tokens` returns


class RoutingComparison(Snapshot, TokenWindow, ipywidgets.VBox):
    """Two routings of the same tokens compared (`analysis.compare`, once): per layer, a bar chart of the share
    of tokens given the same expert set (`agreement`) and the mean Jaccard overlap of the sets; below, a window
    of tokens, each coloured by the first layer whose expert sets differ (white where they agree everywhere),
    its hover naming both sides' experts there. Clicking a bar (or `select(layer)`) marks instead the tokens
    whose sets differ at that layer. Reads only the window from the stores."""

    def __init__(self, a: Source, b: Source, *, names: tuple[str, str] = ("a", "b"), start: int = 0,
                 length: int = 200, decode: Callable[[int], str] | None = None):
        super().__init__()
        if not (isinstance(names, (tuple, list)) and len(names) == 2 and all(isinstance(x, str) for x in names)
                and names[0] != names[1]):
            raise ValueError(f"names must be two different strings, got {names!r}")
        self.names = tuple(names)
        (self.a, source_a), (self.b, source_b) = open_source(a), open_source(b)
        self.sources = (source_a, source_b)
        self.result = A.compare(self.a, self.b)
        self.layers, self.n_tokens, self.k = routed_layers(self.a), self.a.sizes["token"], self.a.sizes["k"]
        self.first_divergence = self.result.first_divergence.values
        ids = next((ds.input_ids for ds in (self.a, self.b) if "input_ids" in ds), None)
        self.input_ids = ids
        if decode is None:
            decode = byte_text if ids is not None and int(ids.max()) < 256 else str
        self.decode = decode
        self.layer: int | None = None  # the selected layer; None: colour by the first differing layer
        self._window_controls(start, length)
        self.divergence_button = ipywidgets.Button(description="next divergence")
        self.all_layers_button = ipywidgets.Button(description="all layers")
        self.divergence_button.on_click(lambda _: self.next_divergence())
        self.all_layers_button.on_click(lambda _: self.select(None))
        for control in (self.start_box, self.length_box):
            control.observe(lambda _: self._render(), "value")
        self.bars = self._bar_figure()
        self.bars.data[0].on_click(self._on_click)
        self.bars.data[1].on_click(self._on_click)
        self.header, self.legend, self.text = ipywidgets.HTML(), ipywidgets.HTML(), ipywidgets.HTML()
        self.select(None)
        self.children = [self.bars,
                         ipywidgets.HBox([self.start_box, self.length_box, self.prev_button, self.next_button,
                                          self.divergence_button, self.all_layers_button]),
                         self.header, self.legend, self.text]

    def _bar_figure(self) -> FigureWidget:
        """Agreement and Jaccard per layer (categorical x), y in [0, 1]; hash-routed layers hatched."""
        r = self.result
        x = [str(layer) for layer in self.layers]
        hashed = r.hash_routed.values.tolist()
        agree = np.round(r.agreement.values * self.n_tokens).astype(np.int64)
        note = [" (hash-routed: routes by token id)" if h else "" for h in hashed]
        pattern = dict(shape=["/" if h else "" for h in hashed])
        fig = FigureWidget([
            go.Bar(x=x, y=r.agreement.values.tolist(), name="agreement (same expert set)", marker_pattern=pattern,
                   customdata=[[int(c), s] for c, s in zip(agree, note)],
                   hovertemplate=f"layer %{{x}}%{{customdata[1]}}<br>agreement %{{y:.4f}}: %{{customdata[0]:,}} of "
                                 f"{self.n_tokens:,} tokens with the same expert set<extra></extra>"),
            go.Bar(x=x, y=r.jaccard.values.tolist(), name="Jaccard |A ∩ B| / |A ∪ B|", marker_pattern=pattern,
                   customdata=note, hovertemplate="layer %{x}%{customdata}<br>mean Jaccard %{y:.4f}<extra></extra>")])
        title = (f"{self.names[0]} vs {self.names[1]}: expert sets per layer over {self.n_tokens:,} tokens"
                 + (" (hatched: hash-routed)" if any(hashed) else ""))
        fig.update_layout(title=title, barmode="group", height=340, margin=dict(t=60, b=40),
                          xaxis=dict(title="layer", type="category"),
                          yaxis=dict(title="share", range=[0, 1]), legend=dict(orientation="h", y=-0.25))
        return fig

    def select(self, layer: int | None) -> None:
        """Mark the tokens whose expert sets differ at `layer` (its bars outlined); None: colour each token by
        the first layer where they differ."""
        self.layer = None if layer is None else check_layer(layer, self.layers)
        line = [3 if x == self.layer else 0 for x in self.layers]
        with self.bars.batch_update():
            for bar in self.bars.data:
                bar.marker.line = dict(width=line, color="black")
        self._render()

    def next_divergence(self) -> int | None:
        """Move the window to the next token after it where the two differ (at the selected layer, or at any);
        the new start, or None (the window stays) if there is none."""
        after = self._differing(self.stop, self.layer, 1)
        if len(after) == 0:
            return None
        self.start_box.value = int(after[0])
        return int(after[0])

    def diverging_tokens(self, layer: int | None = None, limit: int = 1000) -> np.ndarray:
        """The first `limit` token positions where the two expert sets differ at `layer` (at any layer if None),
        in order."""
        layer = None if layer is None else check_layer(layer, self.layers)
        return self._differing(0, layer, check_int(limit, "limit", 1, MAX_DIVERGING))

    def _differing(self, start: int, layer: int | None, limit: int) -> np.ndarray:
        """Up to `limit` positions from `start` on that differ at `layer` (any layer: first_divergence alone;
        one layer: its ids read a block at a time, only where some layer up to it differs)."""
        first = self.first_divergence
        if layer is None:
            return start + np.flatnonzero(first[start:] != NEVER)[:limit]
        found: list[np.ndarray] = []
        for s, e in self._blocks(start, layer):
            x, y = self._ids(s, e, layer)
            found.append(s + np.flatnonzero(differs(x, y)))
            if sum(map(len, found)) >= limit:
                break
        return np.concatenate(found)[:limit] if found else np.zeros(0, np.int64)

    def _blocks(self, start: int, layer: int) -> Iterator[tuple[int, int]]:
        """Token ranges of at most MAX_WINDOW from `start` on that hold a token whose sets may differ at `layer`
        (its first divergence is at or before it)."""
        first = self.first_divergence
        candidates = start + np.flatnonzero((first[start:] != NEVER) & (first[start:] <= layer))
        while len(candidates):
            s = int(candidates[0])
            e = min(s + MAX_WINDOW, self.n_tokens)
            yield s, e
            candidates = candidates[candidates >= e]

    def _ids(self, s: int, e: int, layer: int | None) -> tuple[np.ndarray, np.ndarray]:
        """a's and b's topk_ids over tokens [s, e) at `layer` ([t, k]) or at every layer ([L, t, k])."""
        pick = {"token": slice(s, e)} | ({} if layer is None else {"layer": self.layers.index(layer)})
        return self.a.topk_ids.isel(pick).values, self.b.topk_ids.isel(pick).values

    def window(self) -> xr.Dataset:
        """The shown tokens: input_ids (where either side holds them), a's and b's topk_ids (`a_topk_ids`,
        `b_topk_ids`) and whether their sets differ (`differs`) at the selected layer or at every layer, and
        first_divergence; read for the window only."""
        s, e = self.start, self.stop
        x, y = self._ids(s, e, self.layer)
        dims = ("token", "k") if self.layer is not None else ("layer", "token", "k")
        coords: dict[str, Any] = {"token": np.arange(s, e)}
        if self.layer is None:
            coords["layer"] = self.layers
        variables: dict[str, Any] = {"a_topk_ids": (dims, x), "b_topk_ids": (dims, y),
                                     "differs": (dims[:-1], differs(x, y)),
                                     "first_divergence": ("token", self.first_divergence[s:e])}
        if self.input_ids is not None:
            variables["input_ids"] = ("token", self.input_ids.isel(token=slice(s, e)).values)
        return xr.Dataset(variables, coords=coords,
                          attrs={"names": list(self.names), "layer": "all" if self.layer is None else self.layer})

    def html(self) -> str:
        """The HTML shown for the window: one span per token, class `mwb-diff` where the sets differ."""
        return self.text.value

    def static_html(self) -> str:
        """Per-layer agreement and Jaccard as a table, then the coloured window with its legend."""
        r = self.result
        rows = "".join(f"<tr><td>{layer}{' (hash-routed)' if h else ''}</td><td>{100 * g:.1f} %</td>"
                       f"<td>{100 * j:.1f} %</td></tr>" for layer, g, j, h in
                       zip(self.layers, r.agreement.values, r.jaccard.values, r.hash_routed.values))
        return (f"<p><strong>{html.escape(self.bars.layout.title.text)}</strong></p>"
                "<table class='mwb-comparison-table'><tr><th>layer</th><th>agreement (same expert set)</th>"
                f"<th>mean Jaccard</th></tr>{rows}</table>{self.header.value}{self.legend.value}{self.text.value}")

    def _render(self) -> None:
        win = self.window()
        self.text.value = self._tokens_html(win)
        self.legend.value = self._legend_html(win)
        where = "any layer" if self.layer is None else f"layer {self.layer}"
        n = int(win.differs.any("layer").sum() if self.layer is None else win.differs.sum())
        a, b = (html.escape(x) for x in self.names)
        self.header.value = (f"<div class='mwb-comparison-header'><b>{a}</b> {html.escape(self.sources[0])} vs "
                             f"<b>{b}</b> {html.escape(self.sources[1])}: tokens {self.start:,}..{self.stop:,} of "
                             f"{self.n_tokens:,}, {n} differ at {where}</div>")

    def _layer_colour(self, layer: int) -> str:
        index = np.array([self.layers.index(layer) / max(len(self.layers) - 1, 1)])
        return colours.css(tuple(int(c) for c in colours.sequential_rgb(index, 1.0)[0]))

    def _tokens_html(self, win: xr.Dataset) -> str:
        ids = win.input_ids.values if "input_ids" in win else None
        x, y, differ = win.a_topk_ids.values, win.b_topk_ids.values, win.differs.values
        (na, nb), spans = self.names, []
        for j, pos in enumerate(win.token.values):
            text = self.decode(int(ids[j])) if ids is not None else "·"
            if self.layer is None:
                first = int(win.first_divergence.values[j])
                layer, diff = first, first != NEVER
                i = self.layers.index(first) if diff else 0
                sa, sb = x[i, j], y[i, j]
            else:
                layer, diff, sa, sb = self.layer, bool(differ[j]), x[j], y[j]
            title = f"token {pos}: {text} | "
            if diff:
                title += (f"{'first differs at' if self.layer is None else 'differs at'} layer {layer}: "
                          f"{na} {expert_list(sa)} vs {nb} {expert_list(sb)}")
                background = self._layer_colour(layer) if self.layer is None else colours.css(colours.ABOVE)
            else:
                title += ("same experts at every layer" if self.layer is None else
                          f"same experts at layer {layer}: {expert_list(sa)}")
                background = SAME
            style = f"background:{background};color:{text_colour(background)}"
            spans.append(f'<span class="{"mwb-diff" if diff else "mwb-same"}" style="{style}" '
                         f'title="{html.escape(title)}">{html.escape(text)}</span>')
        return ('<div class="mwb-comparison" style="font-family:monospace;white-space:pre-wrap;line-height:1.9">'
                + "".join(spans) + "</div>")

    def _legend_html(self, win: xr.Dataset) -> str:
        """What each background means, with the window's count of each."""
        def chip(background: str, label: str) -> str:
            return (f'<span style="background:{background};color:{text_colour(background)};padding:0 4px;'
                    f'margin-right:4px;border:1px solid #ccc">{html.escape(label)}</span>')
        if self.layer is not None:
            n, m = int(win.differs.sum()), win.sizes["token"]
            return (f"<div class='mwb-comparison-legend'>layer {self.layer}: "
                    f"{chip(colours.css(colours.ABOVE), f'expert sets differ: {n}')}{chip(SAME, f'same: {m - n}')}"
                    "</div>")
        first = win.first_divergence.values
        chips = [chip(self._layer_colour(layer), f"layer {layer}: {int((first == layer).sum())}")
                 for layer in self.layers]
        return (f"<div class='mwb-comparison-legend'>first layer whose expert sets differ: {''.join(chips)}"
                f"{chip(SAME, f'same at every layer: {int((first == NEVER).sum())}')}</div>")

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.xs:
            self.select(int(points.xs[0]))

    def __repr__(self) -> str:
        return (f"RoutingComparison({self.names[0]}={self.sources[0]!r}, {self.names[1]}={self.sources[1]!r}, "
                f"tokens {self.start:,}..{self.stop:,} of {self.n_tokens:,}, "
                f"layer={'all' if self.layer is None else self.layer})")


def differs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether the expert sets of `x` and `y` (ids on the last axis) differ, order aside."""
    return (np.sort(x, -1) != np.sort(y, -1)).any(-1)


def expert_list(ids: np.ndarray) -> str:
    return "{" + ", ".join(str(int(e)) for e in sorted(ids)) + "}"


def text_colour(background: str) -> str:
    """Black text on light backgrounds, white on the dark end of viridis."""
    if not background.startswith("rgb("):
        return "black"
    r, g, b = (int(c) for c in background[4:-1].split(","))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "white"
