"""JupyterLab views for moe-workbench, shipped as a prebuilt labextension.

The wheel installs the built extension under share/jupyter/labextensions/moe-workbench-jupyterlab, where
JupyterLab finds it by itself; `_jupyter_labextension_paths` lets `jupyter labextension develop` link a
source checkout instead.
"""

__version__ = "0.1.0"


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "moe-workbench-jupyterlab"}]
