"""Notebook widgets over routing data: a routing dashboard, an expert profile, a token view, a long-context
navigator and an intervention panel. Each is an `ipywidgets.VBox` (it displays itself) whose data path lives in
plain methods that run without a browser. `ExpertProfile` shows one expert at one layer, alone or in the dashboard.

`source` is a routing Dataset (`wb.open_store(path)`, `analysis.from_cache(...)`) or a store path. Counting
happens here in Python, streaming the store in blocks (the analyses in `workbench.analysis`, or bounded
blocks of one layer for the navigator); the browser only receives aggregates. Payloads stay small: E x E
and bins x E matrices are rounded to 1/1000 of their largest value (2-D arrays travel as JSON text), and the
navigator caps bins x experts at MAX_CELLS values, so a 1M-token store with 384 experts sends well under
2 MB per widget.
`RoutingComparison` sets two routings of the same tokens side by side (`analysis.compare`, then a token window).

Each widget's display bundle also carries `text/html`: a static snapshot of what it shows when displayed (the
load heatmap, the coloured tokens, the navigator's heatmap, the panel's last result), which is what a notebook
shows where no kernel runs the widget: published HTML, GitHub, nbviewer.
"""

from .common import MAX_CELLS, MAX_WINDOW, PALETTE
from .comparison import RoutingComparison
from .dashboard import RoutingDashboard
from .navigator import LongContextNavigator, bin_entropy
from .panel import InterventionPanel
from .profile import ExpertProfile
from .token_view import TokenView

__all__ = ["MAX_CELLS", "MAX_WINDOW", "PALETTE", "ExpertProfile", "InterventionPanel", "LongContextNavigator",
           "RoutingComparison", "RoutingDashboard", "TokenView", "bin_entropy"]
