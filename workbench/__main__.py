"""`python -m workbench` runs the command line."""

import os

from . import distributed
from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank: its process group is gone, its store closed
    distributed.leave(code)
raise SystemExit(code)
