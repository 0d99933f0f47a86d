"""Streaming activation store: `trace` runs one long sequence chunk by chunk through a model and writes what
its hooks see to a zarr v3 store; `open_store` reads it back as an xarray Dataset lazily backed by dask.

Its variables follow `workbench.schema`; `layout` lays them out in chunks, `disk` opens, creates and locks the
store (crash safety), `tracing` runs the chunked forward and commits each chunk, `integrity` checksums chunks and
names the damaged ones (`check`).
"""

from ..errors import StoreError
from ..models.base import CausalLM
from ..schema import TRAILING_DIMS, trailing_dims
from .disk import check, disk_bytes, open_store
from .integrity import Damage
from .tracing import trace


# Models sit below the store (docs/architecture.md), so the store gives them their `trace` method rather than
# the model importing the store; `import workbench` runs this line before any model exists.
CausalLM.trace = trace  # model.trace(tokens, out, ...) is trace(model, tokens, out, ...)

__all__ = ["trace", "open_store", "check", "Damage", "disk_bytes", "StoreError", "TRAILING_DIMS", "trailing_dims"]
