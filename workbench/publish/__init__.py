"""Reproducible analyses: `publish` executes a notebook in a fresh kernel and writes it, executed, with a
self-contained HTML rendering and a manifest of everything its results rest on (`publishing`); `verify`
re-executes it and says what, if anything, came out differently (`verifying`). What the manifest records is
collected by `workbench.provenance` while the notebook runs.
"""

from __future__ import annotations

import os
from typing import Any

from .. import provenance
from ..provenance import record_input, record_seed
from .publishing import (DEFAULT_TIMEOUT, FORMAT, MANIFEST, NETWORK_SCRIPT, NotebookError, PublishError, parse_value,
                         publish, to_html)
from .verifying import ReproducibilityWarning, compare, read_manifest, verify

__all__ = ["publish", "verify", "read_manifest", "compare", "parse_value", "to_html", "record_input", "record_seed",
           "PublishError", "NotebookError", "ReproducibilityWarning", "MANIFEST", "FORMAT", "DEFAULT_TIMEOUT",
           "NETWORK_SCRIPT"]

# Temporary: the loader, analysis.from_cache and store.trace still call these here; they go once those call
# `workbench.provenance` themselves.
record_model = provenance.record_model
record_dataset = provenance.record_dataset


def record_store(path: str | os.PathLike, seed: Any = None) -> None:
    """Temporary: `workbench.trace`'s record of a finished store, until it calls `provenance.record_dataset`."""
    if provenance.active():
        from ..store import open_store

        provenance.record_dataset(open_store(path), seed=seed, path=path)
