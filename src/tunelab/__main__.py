import sys

from tunelab.cli.__main__ import run

sys.exit(run())
