"""`python -m tunelab.cli`: the `tunelab` command, as `python -m tunelab` runs it."""
import os
import signal
import sys

from tunelab.cli import main

INTERRUPTIBLE = "TUNELAB_INTERRUPTIBLE"
"""Set by the dashboard for its `tunelab train` children, which it stops with SIGINT: a server
started in the background of a shell script has SIGINT ignored, its children inherit that, and
Python then leaves Ctrl-C ignored too, so the stop would go unheard."""


def run() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get(INTERRUPTIBLE) == "1":
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return main()


if __name__ == "__main__":
    sys.exit(run())
