"""What the widgets share: opening a source, checking arguments, token text, compact payloads and the
static snapshot every widget adds to its display bundle."""

from __future__ import annotations

import colorsys
import html
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import anywidget
import ipywidgets
import numpy as np
import traitlets
import xarray as xr

from .. import analysis as A
from ..store import open_store


# 32 categorical colours (16 hues at two lightnesses, all readable under black text); expert e gets
# PALETTE[e % 32], in the token view and in the navigator's lines alike
PALETTE = tuple("#%02x%02x%02x" % tuple(round(255 * c) for c in colorsys.hls_to_rgb(
    (i * 5 % 16) / 16, 0.80 if i < 16 else 0.64, 0.70)) for i in range(32))
MAX_CELLS = 150_000  # the navigator's bins x experts bound: about 1.3 MB of heatmap as JSON
MAX_WINDOW = 4096  # tokens one TokenView window may show
Source = xr.Dataset | str | os.PathLike


def open_source(source: Source) -> tuple[xr.Dataset, str]:
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


def routed_layers(ds: xr.Dataset) -> list[int]:
    return [int(x) for x in ds.layer.values]


def check_layer(layer: Any, layers: list[int]) -> int:
    """`layer` as an int, if it is one of `layers`; else a ValueError naming them."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in layers:
        raise ValueError(f"layer must be one of the routed layers {layers}, got {layer!r}")
    return int(layer)


def pick_layer(layer: int | None, layers: list[int], hashed: Sequence[bool]) -> int:
    """`layer` checked against `layers`; by default the first layer not hash-routed (else the first)."""
    if layer is None:
        return next((x for x, h in zip(layers, hashed) if not h), layers[0])
    return check_layer(layer, layers)


def check_int(value: Any, name: str, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi], else a ValueError naming `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")
    return int(value)


def byte_text(i: int) -> str:
    """A byte-level token as text: printable ASCII as itself, anything else escaped (\\n, \\x00)."""
    if 32 <= i < 127:
        return chr(i)
    return {9: "\\t", 10: "\\n", 13: "\\r"}.get(i, f"\\x{i:02x}")


def visible(text: str) -> str:
    """`text` with control characters escaped, so whitespace tokens show."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def expert_colour(expert: int) -> str:
    return PALETTE[expert % len(PALETTE)]


def compact_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    """A matrix for a heatmap as nested lists rounded to 1/1000 of its largest value or finer, NaN as None:
    a FigureWidget sends 2-D arrays to the browser as JSON text, so this keeps a 384 x 384 matrix near 1.3 MB
    and valid JSON."""
    finite = matrix[np.isfinite(matrix)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    rounded = np.round(matrix, 3 - math.floor(math.log10(top)) if top > 0 else 0)
    return [[None if x != x else x for x in row] for row in rounded.tolist()]


def position_label(p: int) -> str:
    """A token position in a few characters: 987, 12K, 1.05M."""
    return f"{p / 1e6:.2f}M" if p >= 1_000_000 else f"{p / 1e3:.0f}K" if p >= 10_000 else str(p)


class Snapshot:
    """Adds `text/html` to a widget's display bundle: a static snapshot (`static_html`) of what it shows, for
    wherever no kernel runs the widget. JupyterLab still draws the live widget (its MIME type ranks first)."""

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/html"] = (f"<div class='mwb-snapshot'>{self.static_html()}<p><small>static snapshot of "
                               f"{html.escape(type(self).__name__)}: run the notebook for the interactive "
                               "widget</small></p></div>")
        return bundle


class TokenWindow:
    """Paging through `n_tokens` tokens a window at a time: start and length boxes, and prev/next buttons that
    move the start by one window (the widget sets `n_tokens` and defines `_render`)."""

    n_tokens: int

    def _window_controls(self, start: int, length: int) -> None:
        """The start and length boxes (their values checked first) and the prev/next buttons."""
        self.start_box = ipywidgets.BoundedIntText(value=check_int(start, "start", 0, self.n_tokens - 1), min=0,
                                                   max=self.n_tokens - 1, description="start")
        self.length_box = ipywidgets.BoundedIntText(value=check_int(length, "length", 1, MAX_WINDOW), min=1,
                                                    max=MAX_WINDOW, description="length")
        self.prev_button = ipywidgets.Button(description="< prev")
        self.next_button = ipywidgets.Button(description="next >")
        self.prev_button.on_click(lambda _: self._step(-1))
        self.next_button.on_click(lambda _: self._step(1))

    @property
    def start(self) -> int:
        return self.start_box.value

    @property
    def length(self) -> int:
        return self.length_box.value

    @property
    def stop(self) -> int:
        """One past the window's last token (the window ends at the last token)."""
        return min(self.start + self.length, self.n_tokens)

    def _step(self, direction: int) -> None:
        self.start_box.value = min(max(self.start + direction * self.length, 0), self.n_tokens - 1)


class ClickableHTML(anywidget.AnyWidget):
    """HTML whose elements with a `data-pos` attribute report clicks: `clicked` becomes that position (an int)
    and is reset to -1 once handled, so clicking the same element twice reports twice."""

    _esm = """
    function render({ model, el }) {
      const draw = () => { el.innerHTML = model.get("value"); };
      draw();
      model.on("change:value", draw);
      el.addEventListener("click", (event) => {
        const target = event.target.closest("[data-pos]");
        if (!target || !el.contains(target)) return;
        model.set("clicked", Number(target.dataset.pos));
        model.save_changes();
      });
    }
    export default { render };
    """
    value = traitlets.Unicode("").tag(sync=True)
    clicked = traitlets.Int(-1).tag(sync=True)

    def on_position(self, callback: Callable[[int], None]) -> None:
        """Call `callback(position)` on every click of an element with `data-pos`."""
        def changed(change: dict[str, Any]) -> None:
            if change["new"] >= 0:
                try:
                    callback(change["new"])
                finally:
                    self.clicked = -1
        self.observe(changed, "clicked")
