"""`python -m tunelab.cli`: the `tunelab` command, as `python -m tunelab` runs it."""
import os
import sys

from tunelab.cli import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
