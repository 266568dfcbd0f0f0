"""Trainings started from the dashboard: `tunelab train` in a child process, and the progress
of any run read back from its folder.

The child is the ordinary command line (`python -m tunelab train RECIPE key=value ...
run_dir=RUN`), not `train()` in the server: a training then cannot block or crash the server,
it releases its memory when it ends, and what the page shows as the command is exactly what
was run (it can be pasted in a terminal to do it again). Its output goes to RUN/train.log.

One dashboard training runs at a time: on the few cores of a laptop two would each run at
half speed, and a second start while one runs is more often a double click than a wish.
"""
from __future__ import annotations

import datetime as dt
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab import experiments
from tunelab.cli.__main__ import INTERRUPTIBLE
from tunelab.errors import TunelabError

LOG_FILE = "train.log"
LOG_TAIL_LINES = 40


class Busy(TunelabError):
    """A dashboard training is still running."""


@dataclass
class Job:
    run_dir: Path
    argv: list[str]
    process: subprocess.Popen
    started: float


class Launcher:
    """Starts `tunelab train` children, at most one at a time, and reports on the last one."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        """Folder the children run in: recipe and data paths are relative to it, as in a
        terminal opened where `tunelab ui` was started."""
        self.job: Job | None = None
        self._lock = threading.Lock()  # two quick POSTs must not both pass the busy check

    def start(self, recipe: str | None, overrides: list[str], run_dir: Path) -> Job:
        with self._lock:
            if self.job is not None and self.job.process.poll() is None:
                raise Busy(f"a training is already running ({self.job.run_dir}); wait for it "
                           "to finish or stop it")
            run_dir.mkdir(parents=True)
            argv = [sys.executable, "-m", "tunelab", "train", *([recipe] if recipe else []),
                    *overrides, f"run_dir={run_dir}"]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                   INTERRUPTIBLE: "1"}
            with open(run_dir / LOG_FILE, "wb") as log:  # the child keeps its own handle
                process = subprocess.Popen(argv, cwd=self.cwd, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env)
            self.job = Job(run_dir, argv, process, time.time())
            return self.job

    def stop(self) -> None:
        """Ctrl-C for the child: it writes status `interrupted` and keeps its last checkpoint,
        so `tunelab train --resume RUN` can continue it."""
        if self.job is None or self.job.process.poll() is not None:
            raise TunelabError("no dashboard training is running")
        self.job.process.send_signal(signal.SIGINT)

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Stop a running child when the server stops, rather than leave it orphaned."""
        if self.job is None or self.job.process.poll() is not None:
            return
        self.job.process.send_signal(signal.SIGINT)
        try:
            self.job.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.job.process.kill()
            self.job.process.wait()

    def report(self, runs_root: Path) -> dict | None:
        """The last dashboard training: its state, command, progress and log tail."""
        job = self.job
        if job is None:
            return None
        code = job.process.poll()
        has_config = (job.run_dir / "config.yaml").is_file()
        if code is None:
            state = experiments.status_of(job.run_dir) if has_config else "starting"
        elif has_config:
            state = experiments.status_of(job.run_dir)
        else:  # it stopped before writing its run files: a config or data error
            state = "finished" if code == 0 else "failed"
        tail = log_tail(job.run_dir / LOG_FILE)
        return {"run": run_id(job.run_dir, runs_root), "state": state, "returncode": code,
                "running": code is None, "command": display_command(job.argv, self.cwd),
                "progress": progress(job.run_dir) if has_config else None,
                "error": None if code in (None, 0) else failure(job.run_dir, tail),
                "log": tail}


def display_command(argv: list[str], cwd: Path) -> str:
    """The child's command as a user would type it: `tunelab train ...`, paths relative to the
    folder it ran in."""
    here = str(cwd.resolve()) + os.sep
    words = ["tunelab"] + [w[len(here):] if w.startswith(here) else w.replace(f"={here}", "=")
                           for w in argv[3:]]
    return shlex.join(words)


def run_id(run_dir: Path, runs_root: Path) -> str:
    """How the API names a run: its path below the runs folder, with forward slashes."""
    return Path(os.path.relpath(run_dir, runs_root)).as_posix()


def progress(run_dir: Path) -> dict:
    """Step, total steps, last training loss, last validation value and an ETA, from the files
    any run writes (metrics.jsonl, env.json): it works for runs started in a terminal too.

    The ETA assumes the remaining steps take as long as the ones done since env.json was
    written (just before the first step), evaluations included; after a resume it counts the
    resumed steps as done in that time, so it is optimistic until the run finishes."""
    records = experiments.read_metrics(run_dir)
    env = experiments.read_optional_json(run_dir / "env.json")
    config = experiments.read_config(run_dir)
    metric = experiments.task_metric(config)
    train = [r for r in records if "split" not in r and "loss" in r]
    val = [r for r in records if r.get("split") == "validation" and metric in r]
    step = max((r.get("step", 0) for r in records), default=0)
    total = env.get("total_steps")
    elapsed = eta = None
    if env.get("created"):
        elapsed = max(0.0, time.time() - dt.datetime.fromisoformat(env["created"]).timestamp())
        if step and total:
            eta = elapsed * (total - step) / step
    return {"step": step, "total_steps": total, "loss": train[-1]["loss"] if train else None,
            "metric": metric, "validation": val[-1][metric] if val else None,
            "elapsed_s": elapsed, "eta_s": eta if experiments.status_of(run_dir) == "running"
            else None}


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, as a terminal would show them: a progress bar redraws itself
    with carriage returns, so only the last state of each line is kept."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
        text = f.read().decode("utf-8", errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(shown[-lines:]).strip("\n")


def failure(run_dir: Path, tail: str) -> str:
    """Why a child failed: status.json's error, else the CLI's `error: ...` line, else the end
    of its log (a traceback)."""
    said = experiments.read_status(run_dir).get("error")
    if said:
        return said
    errors = [line[len("error: "):] for line in tail.splitlines() if line.startswith("error: ")]
    return errors[-1] if errors else (tail.splitlines() or ["no output"])[-1]
