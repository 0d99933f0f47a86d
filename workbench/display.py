"""Rich notebook display of routing Datasets: stores (`open_store`), in-memory traces (`analysis.from_cache`)
and analysis results. Each shows as a routing summary under the MIME type `MIME`, drawn without a kernel by
the JupyterLab extension, with `text/html` and `image/png` fallbacks so saved notebooks render on GitHub,
nbviewer and in exported HTML.

The Datasets stay plain xarray objects (the store contract); `register()` (run on `import workbench` inside
IPython) adds `routing_bundle` to IPython's mimebundle formatter for Datasets, which is what a
`_repr_mimebundle_` method would do, and leaves other Datasets to xarray.
"""

from __future__ import annotations

import base64
import html
import io
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from . import colours
from .schema import TOPK_IDS

if TYPE_CHECKING:
    import xarray as xr

MIME = "application/vnd.moe-workbench.routing+json"
VERSION = 1
MAX_SCAN_ENTRIES = 200_000_000  # routing entries (layer, token, k) scanned for a store's load heatmap
PNG_WIDTH = 720


def kind(ds: Any) -> str | None:
    """'store', 'trace' or 'analysis' for a workbench Dataset; None for anything else."""
    import xarray as xr

    if not isinstance(ds, xr.Dataset) or "n_experts" not in ds.attrs:
        return None
    if "workbench_store" in ds.attrs:
        return "store"
    if TOPK_IDS in ds:
        return "trace"
    return "analysis" if "metric" in ds.attrs else None


def routing_summary(ds: xr.Dataset) -> dict[str, Any]:
    """The `MIME` payload: title, (label, value) fields and a layer x expert heatmap with its uniform baseline."""
    from . import analysis

    what = kind(ds)
    if what is None:
        raise ValueError("not a workbench routing Dataset (a store, analysis.from_cache output or analysis result)")
    attrs = ds.attrs
    E, k = int(attrs["n_experts"]), int(attrs.get("k", ds.sizes.get("k", 0)))
    fields: list[tuple[str, str]] = []
    heatmap = None
    if what in ("store", "trace"):
        tokens, layers = ds.sizes.get("token", 0), [int(x) for x in ds.layer.values]
        if what == "store":
            fields += [("model", str(attrs.get("source"))), ("revision", _short(attrs.get("commit") or
                                                                               attrs.get("revision")))]
            done = "complete" if attrs.get("complete") else f"incomplete ({int(attrs['tokens_total']):,} to trace)"
            fields += [("tokens", f"{tokens:,}, {done}")]
        else:
            fields += [("tokens", f"{tokens:,}")]
        fields += [("layers", _ranges(layers)), ("experts", f"{E} routed, top-{k}"),
                   ("variables", ", ".join(sorted(str(v) for v in ds.data_vars)))]
        if what == "store":
            fields += [(label, str(attrs[key])) for label, key in (("backend", "backend"), ("dtype", "dtype"),
                       ("created", "created"), ("workbench", "workbench_version")) if attrs.get(key) is not None]
        entries = len(layers) * tokens * k
        if entries > MAX_SCAN_ENTRIES:
            fields.append(("load", f"not scanned for display ({entries:,} routing entries); "
                                   "run workbench.analysis.expert_load(ds)"))
        elif tokens:
            load = analysis.expert_load(ds)
            heatmap = _heatmap(load.share, "expert load (share of routing slots)", 1 / E)
            fields.append(("MaxVio (mean over layers)", f"{float(load.maxvio.mean()):.3f}"))
    else:
        fields += [("analysis", str(attrs["metric"])), ("tokens", f"{int(attrs.get('tokens', 0)):,}"),
                   ("experts", f"{E} routed, top-{k}")]
        if "mode" in attrs:
            fields.append(("mode", str(attrs["mode"])))
        fields += [(str(name), _describe(v)) for name, v in ds.data_vars.items()]
        grid = [v for v in ds.data_vars.values() if set(v.dims) == {"layer", "expert"} and v.dtype.kind in "iuf"]
        if grid:
            v = grid[0] if "share" not in ds else ds.share
            baseline = v.attrs.get("baseline")
            heatmap = _heatmap(v, f"{v.name}: {v.attrs.get('definition', '')}".rstrip(": "),
                               float(baseline) if isinstance(baseline, (int, float)) else None)
    title = {"store": "routing store", "trace": "routing trace", "analysis": f"{attrs.get('metric')}"}[what]
    return {"version": VERSION, "kind": what, "title": title, "fields": [list(f) for f in fields],
            "heatmap": heatmap}


def routing_bundle(ds: Any) -> dict[str, Any] | None:
    """The display bundle of a workbench Dataset (None for other objects, left to their own repr)."""
    if kind(ds) is None:
        return None
    summary = routing_summary(ds)
    png = to_png(summary)
    bundle = {MIME: summary, "text/html": to_html(summary, png, ds._repr_html_())}
    if png:
        bundle["image/png"] = base64.b64encode(png).decode()
    return bundle


def register(ip: Any = None) -> bool:
    """Display workbench Datasets with `routing_bundle` in IPython `ip` (the running one by default);
    False where there is none."""
    if ip is None and "IPython" in sys.modules:  # a running IPython has imported it; never import it here
        ip = sys.modules["IPython"].get_ipython()
    if ip is None or not hasattr(ip, "display_formatter"):
        return False
    # by name, so that importing workbench does not import xarray
    ip.display_formatter.mimebundle_formatter.for_type_by_name("xarray.core.dataset", "Dataset", routing_bundle)
    return True


def to_html(summary: dict[str, Any], png: bytes | None, xarray_html: str | None = None) -> str:
    """The summary as a table, the heatmap as an inline PNG, and xarray's own view folded below it."""
    rows = "".join(f"<tr><th style='text-align:left'>{html.escape(a)}</th><td style='text-align:left'>"
                   f"{html.escape(b)}</td></tr>" for a, b in summary["fields"])
    image = img_tag(png, summary["heatmap"]["title"]) if png else ""
    folded = f"<details><summary>xarray</summary>{xarray_html}</details>" if xarray_html else ""
    return (f"<div class='mwb-routing-html'><strong>{html.escape(summary['title'])}</strong>"
            f"<table>{rows}</table>{image}{folded}</div>")


def img_tag(png: bytes | None, alt: str) -> str:
    """An inline `<img>` of PNG bytes (nothing for None): needs no file and no network."""
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>" \
        if png else ""


def to_png(summary: dict[str, Any]) -> bytes | None:
    """The summary's heatmap as a PNG (Pillow), None without one: coloured around its uniform baseline (see
    `workbench.colours`), or on the sequential scale where the heatmap says `"scale": "sequential"`."""
    from PIL import Image, ImageDraw

    hm = summary.get("heatmap")
    if not hm:
        return None
    values = np.array([[np.nan if v is None else v for v in row] for row in hm["values"]], dtype=np.float64)
    L, E = values.shape
    left, top, bottom = 40, 24, 20
    cell_w = max(1, (PNG_WIDTH - left - 10) // max(E, 1))
    cell_h = max(2, min(24, 480 // max(L, 1)))
    image = Image.new("RGB", (left + cell_w * E + 10, top + cell_h * L + bottom), "white")
    draw = ImageDraw.Draw(image)
    rgb = colours.sequential_rgb(values) if hm.get("scale") == "sequential" else \
        colours.diverging_rgb(values, hm.get("baseline"))
    cells = np.repeat(np.repeat(rgb, cell_h, axis=0), cell_w, axis=1)
    image.paste(Image.fromarray(cells, "RGB"), (left, top))
    draw.text((left, 4), hm["title"][:110], fill="black")
    step = max(1, L // 16)
    for i in range(0, L, step):
        draw.text((4, top + i * cell_h + max(0, cell_h // 2 - 5)), str(hm["layers"][i]), fill="black")
    label = 6 * max(len(str(x)) for x in hm["experts"]) + 10  # pixels a column label needs
    step = max(1, -(-max(label, 28) // cell_w))
    for j in range(0, E, step):
        draw.text((left + j * cell_w, top + L * cell_h + 4), str(hm["experts"][j]), fill="black")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _heatmap(v: xr.DataArray, title: str, baseline: float | None) -> dict[str, Any]:
    v = v.transpose("layer", "expert")
    values = np.asarray(v.values, dtype=np.float64)
    return {"title": title, "layers": [int(x) for x in v.layer.values], "experts": [int(x) for x in v.expert.values],
            "values": [[None if not np.isfinite(x) else round(float(x), 6) for x in row] for row in values],
            "baseline": baseline}


def _describe(v: xr.DataArray) -> str:
    dims = ", ".join(f"{d}: {n}" for d, n in zip(v.dims, v.shape))
    definition = v.attrs.get("definition")
    return f"({dims})" + (f" {definition}" if definition else "")


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts)


def _short(commit: Any) -> str:
    return "-" if not commit else str(commit)[:12]
