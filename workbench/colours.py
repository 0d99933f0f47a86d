"""One colour convention for every view of routing data (the JupyterLab renderer, the widgets, the PNG
fallbacks and published HTML):

- quantities with a reference point (expert load against the uniform share) on a diverging scale centred
  on it: white at the reference, red above, blue below, linear, fully blue at 0 and fully red at twice the
  reference. The ends are ColorBrewer RdBu's, readable under the common colour-blindnesses (red-blue, not
  red-green); extensions/jupyterlab/src/heatmap.ts uses the same ends and the same linear scale.
- quantities without one (probabilities, co-activation, shares of a domain) on viridis (sequential,
  perceptually uniform, colour-blind safe);
- missing values (dead experts, layers not scanned) in grey.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BELOW = (33, 102, 172)  # RdBu's blue end
ABOVE = (178, 24, 43)  # RdBu's red end
CENTRE = (255, 255, 255)
MISSING = (200, 200, 200)
# viridis sampled at 10 evenly spaced points (matplotlib's and plotly's "Viridis")
VIRIDIS = ((68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
           (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37))
SEQUENTIAL = "Viridis"  # the plotly name of the sequential scale
MISSING_CSS = "rgb(200,200,200)"


def css(rgb: tuple[int, int, int]) -> str:
    return "rgb(%d,%d,%d)" % rgb


DIVERGING = [[0.0, css(BELOW)], [0.5, css(CENTRE)], [1.0, css(ABOVE)]]  # plotly colorscale


def diverging(baseline: float) -> dict[str, Any]:
    """Plotly heatmap arguments for a quantity with reference `baseline` (> 0): white at it, fully blue at 0,
    fully red at twice it, as `diverging_rgb` and the JupyterLab renderer draw it."""
    if not baseline > 0:
        raise ValueError(f"a diverging scale needs a positive baseline, got {baseline!r}")
    return {"colorscale": DIVERGING, "zmin": 0.0, "zmax": 2.0 * baseline, "zmid": baseline}


def sequential(zmax: float | None = None) -> dict[str, Any]:
    """Plotly heatmap arguments for a quantity without a reference point: viridis from 0 (to `zmax`)."""
    return {"colorscale": SEQUENTIAL, "zmin": 0.0, **({"zmax": zmax} if zmax is not None else {})}


def diverging_rgb(values: np.ndarray, baseline: float | None) -> np.ndarray:
    """uint8 RGB per value: white at `baseline` (the mean where there is none), red above up to twice it,
    blue below; grey where missing."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    centre = baseline if baseline else (float(finite.mean()) if finite.size else 0.0)
    span = centre if centre > 0 else (float(np.abs(finite - centre).max()) if finite.size else 1.0) or 1.0
    t = np.clip((values - centre) / span, -1, 1)
    up, down = np.clip(t, 0, 1)[..., None], np.clip(-t, 0, 1)[..., None]
    white, red, blue = np.array(CENTRE, float), np.array(ABOVE, float), np.array(BELOW, float)
    rgb = white + up * (red - white) + down * (blue - white)
    rgb[~np.isfinite(values)] = MISSING
    return np.round(rgb).astype(np.uint8)


def sequential_rgb(values: np.ndarray, zmax: float | None = None) -> np.ndarray:
    """uint8 RGB per value on viridis from 0 to `zmax` (the largest value by default); grey where missing."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    top = zmax if zmax else (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    t = np.clip(np.nan_to_num(values / top), 0, 1) * (len(VIRIDIS) - 1)
    lo = np.minimum(t.astype(np.int64), len(VIRIDIS) - 2)
    anchors = np.array(VIRIDIS, float)
    rgb = anchors[lo] + (t - lo)[..., None] * (anchors[lo + 1] - anchors[lo])
    rgb[~np.isfinite(values)] = MISSING
    return np.round(rgb).astype(np.uint8)
