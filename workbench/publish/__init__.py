"""Reproducible analyses: `publish` executes a notebook in a fresh kernel and writes it, executed, with a
self-contained HTML rendering and a manifest of everything its results rest on (`publishing`); `verify`
re-executes it and says what, if anything, came out differently (`verifying`). What the manifest records is
collected by `workbench.provenance` while the notebook runs.
"""

from __future__ import annotations

from ..provenance import record_input, record_seed
from .publishing import (DEFAULT_TIMEOUT, FORMAT, MANIFEST, NETWORK_SCRIPT, NotebookError, PublishError, parse_value,
                         publish, to_html)
from .verifying import ReproducibilityWarning, compare, read_manifest, verify

__all__ = ["publish", "verify", "read_manifest", "compare", "parse_value", "to_html", "record_input", "record_seed",
           "PublishError", "NotebookError", "ReproducibilityWarning", "MANIFEST", "FORMAT", "DEFAULT_TIMEOUT",
           "NETWORK_SCRIPT"]
