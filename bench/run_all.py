"""Run every benchmark script in bench/ with its defaults, one after the other.

    .venv/bin/python bench/run_all.py      # or: make bench

A benchmark is any bench/*.py other than this file and the helpers common.py, mfu.py and
serve_report.py. Each writes its JSON under bench/results/ and its section of
docs/benchmarks.md. Exits non-zero when one failed.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"run_all.py", "common.py", "mfu.py", "serve_report.py"}


def benchmarks() -> list[Path]:
    return sorted(p for p in BENCH.glob("*.py")
                  if p.name not in NOT_BENCHMARKS and not p.name.startswith("_"))


def main() -> int:
    started = time.perf_counter()
    failed = []
    for script in benchmarks():
        print(f"== {script.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(script)], cwd=BENCH.parent).returncode
        print(f"== {script.name}: {'ok' if rc == 0 else f'FAILED (exit code {rc})'} "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(script.name)
    total = time.perf_counter() - started
    print(f"all benchmarks: {total:.0f} s ({total / 60:.1f} min)"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
