"""`python -m workbench` runs the command line."""

import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun rank leaves without interpreter finalization: its process group is destroyed and its store
    # closed by now, and a rank was seen to abort while finalizing after a complete run (SIGABRT, "terminate
    # called without an active exception", rarely), which fails the whole torchrun.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
