"""The token view: a window of the traced text coloured by routing."""

from __future__ import annotations

import html
from collections.abc import Callable

import ipywidgets
import numpy as np
import xarray as xr

from .. import analysis as A
from ..schema import ROUTING_VARIABLES
from .common import (
    byte_text, check_int, ClickableHTML, expert_colour, open_source, pick_layer, routed_layers, Snapshot, Source,
    TokenWindow
)
from .profile import ExpertProfile


class TokenView(Snapshot, TokenWindow, ipywidgets.VBox):
    """A window of the traced text, each token coloured by its first-choice expert at one layer; hovering a
    token shows its position, text, top-k experts, weights and (where recorded) routing margin; clicking it
    opens its first-choice expert's profile at that layer below (`open_profile`). Reads only the window from
    the store."""

    def __init__(self, source: Source, *, layer: int | None = None, start: int = 0, length: int = 200,
                 decode: Callable[[int], str] | None = None):
        super().__init__()
        self.dataset, self.source = open_source(source)
        ds = self.dataset
        if "input_ids" not in ds:
            raise ValueError(f"source {self.source} has no input_ids to show")
        self.n_tokens = ds.sizes["token"]
        layers = routed_layers(ds)
        layer = pick_layer(layer, layers, A.hash_routed(ds).values.tolist())
        if decode is None:
            byte_level = int(ds.input_ids.max()) < 256
            decode = byte_text if byte_level else str
        self.decode = decode
        self.layer_picker = ipywidgets.Dropdown(options=layers, value=layer, description="layer")
        self._window_controls(start, length)
        for control in (self.layer_picker, self.start_box, self.length_box):
            control.observe(lambda _: self._render(), "value")
        self.text = ClickableHTML()
        self.text.on_position(self.open_profile)
        self.legend = ipywidgets.HTML()
        self.profile: ExpertProfile | None = None
        self._render()
        self.children = [ipywidgets.HBox([self.layer_picker, self.start_box, self.length_box, self.prev_button,
                                          self.next_button]),
                         self.legend, self.text]

    @property
    def layer(self) -> int:
        return self.layer_picker.value

    def window(self) -> xr.Dataset:
        """The shown tokens' ids, top-k experts and (where stored) weights at the chosen layer, read from the
        store for the window only (it ends at the last token)."""
        part = self.dataset.isel(token=slice(self.start, self.stop))
        names = [v for v in (*ROUTING_VARIABLES, "router_margin") if v in part]
        return part[names].sel(layer=self.layer).compute()

    def open_profile(self, position: int) -> ExpertProfile:
        """Show, below the text, the profile of the expert that `position` chose first at the shown layer."""
        position = check_int(position, "position", 0, self.n_tokens - 1)
        expert = int(self.dataset.topk_ids.sel(layer=self.layer).isel(token=position, k=0))
        if expert < 0:
            raise ValueError(f"token {position} has no routing at layer {self.layer}")
        if self.profile is None:
            self.profile = ExpertProfile(self.dataset, self.layer, expert, decode=self.decode)
            self.children = [*self.children, self.profile]
        else:
            self.profile.select(self.layer, expert)
        return self.profile

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
            style = f"background:{expert_colour(int(experts[j, 0]))}" if experts[j, 0] >= 0 else ""
            spans.append(f'<span class="mwb-token" data-pos="{pos}" style="{style}" '
                         f'title="{html.escape(title)}">{html.escape(text)}</span>')
        return ('<div class="mwb-tokens" style="font-family:monospace;white-space:pre-wrap;line-height:1.9;'
                'cursor:pointer">'
                + "".join(spans) + "</div>")

    def _legend_html(self, win: xr.Dataset) -> str:
        """The experts that are first choice somewhere in the window, most frequent first, with their colours."""
        first = win.topk_ids.values[:, 0]
        experts, counts = np.unique(first[first >= 0], return_counts=True)
        chips = [f'<span style="background:{expert_colour(int(e))};padding:0 4px;margin-right:4px">'
                 f"expert {e}: {c}</span>" for e, c in sorted(zip(experts, counts), key=lambda x: -x[1])]
        return f"<div>first choice at layer {self.layer}: {''.join(chips)}</div>"

    def _render(self) -> None:
        win = self.window()
        self.text.value = self._tokens_html(win)
        self.legend.value = self._legend_html(win)

    def __repr__(self) -> str:
        return (f"TokenView(source={self.source!r}, layer={self.layer}, tokens {self.start:,}..{self.stop:,} "
                f"of {self.n_tokens:,})")
