"""Helpers every benchmark in bench/ shares: where the data is, running one measurement in a
child process (its own wall time and peak RSS), describing the machine, and writing results
as JSON plus a section of a markdown page.

Benchmarks are scripts, not tests: they print and save figures, nothing asserts a timing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """--data-dir, --out and --markdown with the defaults every benchmark uses."""
    parser.add_argument("--data-dir", type=lambda s: Path(s).resolve(), default=DEFAULT_DATA_DIR,
                        help=f"folder holding the data sets (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / f"{name}.json",
                        help="JSON file the results are written to")
    parser.add_argument("--markdown", type=lambda s: Path(s) if s else None,
                        default=REPO_ROOT / "docs" / "benchmarks.md",
                        help=f"markdown page whose '{name}' section is replaced ('' = none)")


def command_line() -> str:
    """The command as the user would type it again (from the repo root)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


# --------------------------------------------------------------------------------------------
# one measurement = one child process


@dataclass
class ChildRun:
    returncode: int
    wall_seconds: float
    peak_rss_mb: float
    """Peak resident memory of the child itself (not of the benchmark driver)."""
    output_tail: str


def run_child(argv: list[str], env: dict | None = None) -> ChildRun:
    """Run `argv`, wait for it with os.wait4 so the peak RSS is this child's alone
    (RUSAGE_CHILDREN would be the maximum over every child waited for so far)."""
    t0 = time.perf_counter()
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(argv, stdin=devnull, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    tail: list[str] = []
    for line in proc.stdout:  # stream, so progress is visible and the pipe never fills
        text = line.decode("utf-8", "replace")
        sys.stderr.write("    | " + text)
        tail = (tail + [text])[-40:]
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    return ChildRun(proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024,
                    "".join(tail))


# --------------------------------------------------------------------------------------------
# the machine


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else "unknown"


def cpu_bf16_flags() -> list[str]:
    try:
        flags = set(re.findall(r"\S+", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return []
    return sorted(flags & {"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512f"})


def machine_info() -> dict:
    import torch
    import transformers

    info = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "cpu_flags": cpu_bf16_flags(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("peft", "accelerate"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            pass
    return info


def machine_line(info: dict) -> str:
    flags = ", ".join(info["cpu_flags"]) or "none"
    return (f"{info['cpu_model']}, {info['cpus_usable']} usable of {info['cpu_count']} CPUs "
            f"(flags: {flags}); torch {info['torch']}, transformers {info['transformers']}"
            + (f", peft {info['peft']}" if "peft" in info else ""))


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# output


def write_json(path: Path, obj) -> None:
    from tunelab.io import atomic_write_json

    atomic_write_json(path, obj)


def sst2_steps_config(data_dir: Path, method: str, rows: int, steps: int, run_dir: Path):
    """`configs/minilm/sst2_{method}.yaml` on `rows` SST-2 training rows for `steps` optimizer
    steps, with no evaluation, checkpoint or tracker in between: a run to time steps in."""
    from tunelab.config import resolve_config

    sst2 = data_dir / "sst2"
    return resolve_config(f"{REPO_ROOT}/configs/minilm/sst2_{method}.yaml", [
        f"data.train={sst2 / 'train.txt'}", f"data.validation={sst2 / 'dev.txt'}",
        f"data.test={sst2 / 'test.txt'}", f"data.max_train_rows={rows}",
        f"train.max_steps={steps}", "train.eval_every=1000000", "train.save_every=1000000",
        "train.tracker=none", f"run_dir={run_dir}"])


def publish(args, name: str, report: dict, text: str) -> None:
    """Write `report` to --out and `text` to the `name` section of --markdown (unless ''),
    and print `text`."""
    write_json(args.out, report)
    if args.markdown:
        update_markdown_section(args.markdown, name, text)
    print(text)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_markdown_section(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in `path`
    (append the section when the markers are missing, create the page when it is)."""
    from tunelab.io import atomic_write_text

    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else f"{title}\n"
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    elif start in text or end in text:
        raise SystemExit(f"{path}: only one of the markers {start} / {end} is present; "
                         f"fix the page by hand")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# --------------------------------------------------------------------------------------------
# one recipe trained in a child process


def train_job(job_file: str, out_file: str) -> None:
    """The child's side: train the job's recipe + overrides, write its results, preflight and
    resolved config as JSON (called by a benchmark script's hidden --child option)."""
    from tunelab.config import resolve_config
    from tunelab.train.loop import train

    job = json.loads(Path(job_file).read_text())
    config = resolve_config(job["recipe"], job["overrides"])
    run_dir = train(config, quiet=True)
    write_json(Path(out_file), {
        "results": json.loads((run_dir / "results.json").read_text()),
        "preflight": json.loads((run_dir / "preflight.json").read_text()),
        "config": config.to_dict()})


def train_in_child(script: str, recipe: Path, overrides: list[str], tmp: Path,
                   label: str) -> tuple[dict | None, ChildRun]:
    """Run `script --child JOB OUT` (which calls `train_job`) so the peak RSS is the training's
    own; returns (its JSON or None when it failed, the child's measurements)."""
    job_file, out = tmp / "job.json", tmp / "result.json"
    job_file.write_text(json.dumps({"recipe": str(recipe), "overrides": overrides}))
    print(f"[{label}] training {recipe.name} {' '.join(overrides)} ...", file=sys.stderr,
          flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    child = run_child([sys.executable, str(Path(script).resolve()), "--child", str(job_file),
                       str(out)], env=env)
    if child.returncode != 0 or not out.is_file():
        print(f"[{label}] FAILED (exit code {child.returncode}):\n{child.output_tail}",
              file=sys.stderr)
        return None, child
    return json.loads(out.read_text()), child
