"""GET {base_url}moe-workbench/plotly/<version>/widgetbundle.js: the server's plotly widget bundle, which
workbench figures import once per page instead of receiving 5 MB over the kernel's websocket with each figure.

Only the installed plotly's version is served (404 otherwise), so a kernel with another plotly falls back to
sending its own bundle. The response may be cached for good: a version's bundle never changes.
"""

from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web


def plotly_bundle() -> tuple[str, Path] | None:
    """The installed plotly's version and widget bundle, or None if plotly (6 or later) is not installed."""
    try:
        spec = find_spec("plotly")
        installed = version("plotly")
    except (ImportError, PackageNotFoundError):
        return None
    path = Path(spec.origin).parent / "package_data" / "widgetbundle.js" if spec and spec.origin else None
    return (installed, path) if path and path.is_file() else None


class PlotlyBundleHandler(JupyterHandler):
    @web.authenticated
    def get(self, requested: str) -> None:
        found = plotly_bundle()
        if found is None or found[0] != requested:
            raise web.HTTPError(404, f"plotly {requested} is not installed beside this server")
        self.set_header("Content-Type", "text/javascript; charset=utf-8")
        self.set_header("Cache-Control", "private, max-age=31536000, immutable")
        self.finish(found[1].read_bytes())


def setup_handlers(web_app) -> None:
    route = url_path_join(web_app.settings["base_url"], "moe-workbench", "plotly", r"([^/]+)", "widgetbundle.js")
    web_app.add_handlers(".*$", [(route, PlotlyBundleHandler)])
