"""moe-workbench: a hookable runtime and research workbench for open-weight Mixture-of-Experts LLMs."""

from .errors import CheckpointError, HookError, InputError, NonFiniteError, StoreError
from .hooks import HookContext
from .loading import load
from .models.base import State
from .store import open_store, trace
from .version import __version__
from . import display, interventions, sae

display.register()  # inside IPython: routing Datasets show as routing summaries
__all__ = ["load", "CheckpointError", "HookError", "InputError", "NonFiniteError", "HookContext", "interventions",
           "sae", "State", "trace", "open_store", "StoreError", "__version__"]
