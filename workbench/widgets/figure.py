"""Plotly figures whose opening message stays small: a stock `FigureWidget` carries plotly's 5 MB JavaScript
bundle in every opening message; ours carry a 3 KB loader that fetches the bundle once per page instead."""

from __future__ import annotations

import math
from importlib.metadata import version
from pathlib import Path
from typing import Any

import plotly
import plotly.graph_objects as go
import traitlets

BUNDLE = Path(plotly.__file__).parent / "package_data" / "widgetbundle.js"
CHUNK_BYTES = 1 << 20  # the kernel's fallback sends the bundle in messages of this size


class FigureWidget(go.FigureWidget):
    """A plotly `FigureWidget` that loads plotly's widget bundle once per page: from the Jupyter server (the
    moe-workbench-jupyterlab server extension serves the server's plotly, at the kernel's version only), else
    from the kernel in 1 MB messages (then a figure the kernel changes before the bundle arrives may draw its
    displayed state). Either way no websocket message carries the whole 5 MB bundle."""

    _esm = Path(__file__).with_name("figure.js")
    # the bundle's path under the server's base URL; the version in it keeps a kernel and a server with
    # different plotly versions from mixing their halves of the protocol
    _plotly_bundle = traitlets.Unicode(f"moe-workbench/plotly/{version('plotly')}/widgetbundle.js").tag(sync=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_msg(self._send_bundle)

    def _send_bundle(self, _: Any, content: dict, buffers: list) -> None:
        """Answer the loader's request for the bundle (the server did not serve it) with numbered chunks."""
        if not isinstance(content, dict) or content.get("mwb") != "plotly-bundle":
            return
        data = BUNDLE.read_bytes()
        count = math.ceil(len(data) / CHUNK_BYTES)
        for i in range(count):
            self.send({"mwb": "plotly-chunk", "index": i, "count": count},
                      buffers=[data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]])
