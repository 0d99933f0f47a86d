"""One expert's profile at one layer, as feature dashboards show one SAE latent: the tokens it takes in context
(each with its routing at every layer), its domain shares or strongest weights, its load along position, its
co-activation partners, its causal importance where a sweep measured it, and a button to ablate it."""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from .. import analysis as A
from ..causal import open_sweep
from ..errors import InputError
from .common import byte_text, check_int, check_layer, open_source, pick_layer, routed_layers, Snapshot, Source, visible
from .figure import FigureWidget


def percent(share: float) -> str:
    """A share as a percentage: one decimal, or two significant digits below 1%."""
    return "n/a" if share != share else f"{100 * share:.1f}%" if share >= 0.01 or share == 0 else f"{100 * share:.2g}%"


class ExpertProfile(Snapshot, ipywidgets.VBox):
    """The profile of `expert` at `layer` (`analysis.expert_profile`, computed from the store and bounded by its
    arguments): a 2x2 figure (the tokens it takes most often, its share of each domain's tokens with `labels` or
    else its highest-weight positions, its load along position, its co-activation partners; a partner's bar
    selects it) and a table of the top tokens in context. Hovering a token shows its routing at every layer (its
    top-k there), read for that one position. `sweep` (an `open_sweep` Dataset or path) adds the expert's causal
    importance, the loss change per domain when ablated; `panel` (an InterventionPanel) adds a button that
    ablates the expert there. Expert ids are local to a layer."""

    def __init__(self, source: Source, layer: int | None = None, expert: int | None = None, *, labels: Any = None,
                 decode: Callable[[int], str] | None = None, sweep: xr.Dataset | str | os.PathLike | None = None,
                 panel: Any = None):
        super().__init__()
        self.dataset, self.source = open_source(source)
        ds = self.dataset
        self.layers, self.n_experts, self.k = routed_layers(ds), A.expert_count(ds), ds.sizes["k"]
        self.labels = labels
        self.decode = decode or (byte_text if "input_ids" in ds and int(ds.input_ids.max()) < 256 else str)
        self.sweep = open_sweep(sweep) if isinstance(sweep, (str, os.PathLike)) else sweep
        if self.sweep is not None and not (isinstance(self.sweep, xr.Dataset) and "delta_loss" in self.sweep):
            raise InputError(f"sweep must be a causal sweep (workbench.causal.open_sweep) or its path, got "
                             f"{type(sweep).__name__}")
        self.panel = panel
        if layer is None:  # the first layer not hash-routed
            layer = pick_layer(None, self.layers, A.hash_routed(ds).values.tolist())
        layer = check_layer(layer, self.layers)
        if expert is None:
            expert = int(A.expert_load(ds.sel(layer=[layer])).share[0].argmax("expert"))
        # what a click on a partner's bar calls; a container showing the selection elsewhere too sets its own
        self.picked: Callable[[int, int], None] = self.select
        self.profile_figure = self._figure()
        self.profile_figure.data[3].on_click(self._on_partner_click)
        self.tokens_table = ipywidgets.HTML()
        self.causal = ipywidgets.HTML()
        self.message = ipywidgets.HTML()
        self.ablate_button = None
        if panel is not None:
            self.ablate_button = ipywidgets.Button(description="ablate in panel", button_style="warning")
            self.ablate_button.on_click(lambda _: self._ablate_clicked())
        self.selected: tuple[int, int] | None = None
        self.select(layer, expert)
        self.children = [self.profile_figure, self.tokens_table, self.causal,
                         *([ipywidgets.HBox([self.ablate_button, self.message])] if panel is not None else [])]

    def _figure(self) -> FigureWidget:
        second = "share of each domain's tokens" if self.labels is not None else "highest routing weights"
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
        if self.labels is not None:
            fig.add_hline(y=self.k / self.n_experts, line_dash="dash", line_color="gray", row=1, col=2,
                          annotation_text="uniform k/E")
        fig.add_hline(y=1 / self.n_experts, line_dash="dash", line_color="gray", row=2, col=1,
                      annotation_text="uniform 1/E")
        fig.update_layout(width=680, height=560, margin=dict(t=70))
        return FigureWidget(fig)

    def _in_context(self, ids: Sequence[int]) -> str:
        """Context ids as text with the middle token bracketed (-1: outside the sequence, dropped)."""
        mid = len(ids) // 2
        text = [("[" + self._token(i) + "]" if j == mid else self._token(i)) for j, i in enumerate(ids) if i >= 0]
        return html.escape("".join(text) if self.decode is byte_text else " ".join(text))

    def _token(self, i: int) -> str:
        return visible(self.decode(int(i)))

    def routing_at(self, position: int) -> dict[int, list[int]]:
        """The top-k expert ids of the token at `position` at every routed layer, read for that position only."""
        position = check_int(position, "position", 0, self.dataset.sizes["token"] - 1)
        if position not in self._routes:  # the table and the hover show the same positions: read each once
            ids = A.token_reader(self.dataset.topk_ids, self.dataset.encoding.get("source"))(position, position + 1)
            self._routes[position] = {layer: [int(e) for e in row if e >= 0]
                                      for layer, row in zip(self.layers, np.asarray(ids)[:, 0])}
        return self._routes[position]

    def routing_text(self, position: int, sep: str = " | ") -> str:
        """`routing_at(position)` as "L0: 3,17 | L1: 5,9 ..."."""
        return sep.join(f"L{layer}: {','.join(map(str, ids))}" for layer, ids in self.routing_at(position).items())

    def _routing_hover(self, position: int) -> str:
        parts = self.routing_text(position, "\n").split("\n")
        return "<br>".join(" | ".join(parts[i:i + 6]) for i in range(0, len(parts), 6))

    def select(self, layer: int, expert: int) -> None:
        """Show `expert` at `layer`: recompute its profile from the store and redraw everything."""
        layer = check_layer(layer, self.layers)
        expert = check_int(expert, "expert", 0, self.n_experts - 1)
        E = self.n_experts
        p = self.profile = A.expert_profile(self.dataset, layer, expert, labels=self.labels)
        self.selected = (layer, expert)
        self._routes: dict[int, dict[int, list[int]]] = {}
        with self.profile_figure.batch_update():
            tokens, second, position, partners = self.profile_figure.data
            tokens.y = [f"{self._token(t)} ({t})" for t in p.frequent_ids.values]
            tokens.x = p.frequent_count.values.tolist()
            tokens.hovertext = [f"{n} of {m} occurrences; at position {q}: {self._in_context(c)}<br>routing at "
                                f"position {q}:<br>{self._routing_hover(q)}" for n, m, q, c in
                                zip(p.frequent_count.values, p.frequent_occurrences.values,
                                    p.frequent_position.values, p.frequent_context.values)]
            if self.labels is not None:
                second.x, second.y = [str(d) for d in p.domain.values], p.domain_share.values.tolist()
                second.hovertext = [f"{c:,} of {n:,} tokens" for c, n in zip(p.domain_count.values,
                                                                             p.domain_tokens.values)]
            else:
                second.x = [str(q) for q in p.strongest_position.values]
                second.y = p.strongest_weight.values.tolist()
                second.hovertext = [f"position {q}, weight {w:.3f}: {self._in_context(c)}<br>routing at position "
                                    f"{q}:<br>{self._routing_hover(q)}" for q, w, c in
                                    zip(p.strongest_position.values, p.strongest_weight.values,
                                        p.strongest_context.values)]
            position.x, position.y = p.bin_start.values.tolist(), p.position_share.values.tolist()
            position.hovertext = [f"positions {a:,}..{b:,}" for a, b in zip(p.bin_start.values, p.bin_stop.values)]
            partners.x = [str(j) for j in p.partner_expert.values]
            partners.y = p.partner_coactivation.values.tolist()
            self.profile_figure.layout.title = (f"expert {expert}, layer {layer}: takes {p.attrs['count']:,} of "
                                                f"{p.attrs['tokens']:,} tokens ({p.attrs['share'] * E:.2f} x uniform)")
        self.tokens_table.value = self.tokens_html()
        self.importance = self._importance()
        self.causal.value = self.causal_html()
        self.message.value = ""

    @property
    def title(self) -> str:
        return self.profile_figure.layout.title.text

    def tokens_html(self) -> str:
        """The top tokens as an HTML table (class mwb-profile-tokens): token (class mwb-token, its id in
        data-token-id), tokens with that id that took the expert, tokens with that id, the example in context;
        each row's title gives the example position's routing at every layer."""
        p = self.profile
        rows = "".join(
            f"<tr title='{html.escape(f'routing at position {q}: ' + self.routing_text(q), quote=True)}'>"
            f"<td class='mwb-token' data-token-id='{t}'><code>{html.escape(self._token(t))}</code></td>"
            f"<td>{n:,}</td><td>{m:,}</td><td><code>{self._in_context(c)}</code></td></tr>"
            for t, n, m, q, c in zip(p.frequent_ids.values, p.frequent_count.values, p.frequent_occurrences.values,
                                     p.frequent_position.values, p.frequent_context.values))
        return ("<table class='mwb-profile-tokens'><caption>top tokens</caption><tr><th>token</th>"
                "<th>taken (tokens)</th><th>occurrences (tokens)</th><th>in context</th></tr>" + rows + "</table>")

    def _importance(self) -> xr.DataArray | None:
        """The sweep's loss change per domain when the selected expert is ablated; None without a sweep or where
        the sweep did not measure it."""
        if self.sweep is None:
            return None
        layer, expert = self.selected
        s = self.sweep
        if layer not in s.layer.values.tolist() or expert not in s.expert.values.tolist():
            return None
        delta = s.delta_loss.sel(layer=layer, expert=expert)
        return None if delta.isnull().all() else delta

    def causal_html(self) -> str:
        """The causal importance (class mwb-profile-causal): per domain, the next-token loss change when the expert
        is ablated, in nats, and the token-weighted mean; "not in the sweep" where the sweep did not measure the
        expert's layer; empty without a sweep."""
        if self.sweep is None:
            return ""
        layer, expert = self.selected
        if self.importance is None:
            measured = [int(x) for x in self.sweep.layer.values
                        if not self.sweep.delta_loss.sel(layer=x).isnull().all()]
            return (f"<p class='mwb-profile-causal'>causal importance: expert {expert} at layer {layer} is not in "
                    f"the sweep (its layers: {', '.join(map(str, measured))})</p>")
        delta, s = self.importance, self.sweep
        mean = float((delta * s.tokens).sum() / s.tokens.sum())
        rows = "".join(f"<tr><td>{html.escape(str(d))}</td><td>{float(v):+.4g}</td><td>{float(c):.4g}</td>"
                       f"<td>{int(n):,}</td></tr>" for d, v, c, n in
                       zip(s.domain.values, delta.values, s.clean_loss.values, s.tokens.values))
        return (f"<table class='mwb-profile-causal'><caption>causal importance: next-token loss change when expert "
                f"{expert} is ablated at layer {layer} ({html.escape(str(s.attrs.get('ablation', 'zero')))} "
                "ablation)</caption><tr><th>domain</th><th>loss change (nats)</th><th>clean loss (nats)</th>"
                f"<th>predictions</th></tr>{rows}<tr><td>all (token-weighted)</td><td>{mean:+.4g}</td><td></td>"
                f"<td>{int(s.tokens.sum()):,}</td></tr></table>")

    def domains_html(self) -> str:
        """Domain shares as a table: the share of each domain's tokens that take the expert, in percent, against
        the uniform k/E; empty without labels."""
        if self.labels is None:
            return ""
        p = self.profile
        rows = "".join(f"<tr><td>{html.escape(str(d))}</td><td>{percent(float(s))}</td><td>{c:,} of {n:,}</td>"
                       f"<td>{s * self.n_experts / self.k:.2f}</td></tr>" for d, s, c, n in
                       zip(p.domain.values, p.domain_share.values, p.domain_count.values, p.domain_tokens.values))
        return ("<table class='mwb-profile-domains'><caption>share of each domain's tokens (uniform k/E = "
                f"{percent(self.k / self.n_experts)})</caption><tr><th>domain</th><th>share</th><th>tokens</th>"
                f"<th>x uniform</th></tr>{rows}</table>")

    def ablate_in_panel(self) -> dict[str, Any]:
        """Ablate the selected expert at its layer in the intervention panel (its pickers set to match) and return
        the panel's result, as `panel.run(layer, [expert], "ablate")` gives it."""
        if self.panel is None:
            raise InputError("ablate_in_panel: this profile has no intervention panel; pass panel=")
        layer, expert = self.selected
        layers = sorted(self.panel.routers)
        if layer not in layers:
            raise InputError(f"layer {layer} is not an MoE layer of the panel's model (its MoE layers: {layers})")
        experts = self.panel.routers[layer].spec.experts
        if expert >= experts:
            raise InputError(f"expert {expert}: layer {layer} of the panel's model has {experts} experts")
        self.panel.layer_picker.value = layer
        self.panel.expert_picker.value = (expert,)
        self.panel.mode_picker.value = "ablate"
        self.panel._run_args()
        return self.panel.result

    def _ablate_clicked(self) -> None:
        try:
            result = self.ablate_in_panel()
        except ValueError as e:
            self.message.value = f"<b>cannot ablate</b>: {html.escape(str(e))}"
            return
        self.message.value = (f"ablated expert {result['experts'][0]} at layer {result['layer']} in the panel: "
                              f"argmax {'changed' if result['changed'] else 'unchanged'}")

    def _on_partner_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.xs:
            self.picked(self.selected[0], int(points.xs[0]))

    def static_html(self) -> str:
        """The title, the top tokens in context, the domain shares and the causal importance."""
        return (f"<p><strong>{html.escape(self.title)}</strong></p>{self.tokens_html()}{self.domains_html()}"
                f"{self.causal_html()}")

    def __repr__(self) -> str:
        layer, expert = self.selected
        return (f"ExpertProfile(source={self.source!r}, layer={layer}, expert={expert}"
                f"{', by domain' if self.labels is not None else ''}"
                f"{', with a sweep' if self.sweep is not None else ''}"
                f"{', with a panel' if self.panel is not None else ''})")
