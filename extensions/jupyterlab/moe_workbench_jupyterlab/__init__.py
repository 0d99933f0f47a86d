"""JupyterLab views for moe-workbench, shipped as a prebuilt labextension, and a server extension that serves
plotly's widget bundle to the workbench's figures.

The wheel installs the built extension under share/jupyter/labextensions/moe-workbench-jupyterlab, where
JupyterLab finds it by itself; `_jupyter_labextension_paths` lets `jupyter labextension develop` link a
source checkout instead. The server extension is enabled by the wheel's etc/jupyter/jupyter_server_config.d
file.
"""

__version__ = "0.1.0"


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "moe-workbench-jupyterlab"}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "moe_workbench_jupyterlab"}]


def _load_jupyter_server_extension(server_app) -> None:
    from .handlers import setup_handlers

    setup_handlers(server_app.web_app)
