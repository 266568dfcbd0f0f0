"""Runs as experiments: is a run alive, and how do runs compare (`tunelab runs ...`).

Status. While `train` runs, its main process holds an exclusive lock on RUN/.lock and keeps
RUN/status.json true: `running` (pid, host, start), then `finished`, `failed` (with the error)
or `interrupted` (Ctrl-C); a search writes `pruned` over a trial it stopped. A process killed
outright (SIGKILL, out of memory) writes nothing, but the operating system drops its lock, so
`status_of` can still tell a live run from a dead one:

    results.json present                         finished
    lock held                                    running
    status.json says failed/interrupted/pruned   that
    status.json says running, lock free          interrupted (killed); on another host the
                                                 lock cannot be checked: running
    no status.json                               interrupted if it logged a step, else failed

Everything else here only reads run directories (see `tunelab.runs` for their layout).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import yaml

from tunelab.errors import TunelabError
from tunelab.io import atomic_write_bytes, atomic_write_json

STATUS_FILE = "status.json"
LOCK_FILE = ".lock"


# --------------------------------------------------------------------------------------------
# status of a run


@contextlib.contextmanager
def running(run_dir: Path, accelerator) -> Iterator[None]:
    """Hold the run's lock and keep status.json true while the body trains.

    A run that stops on an exception also closes its tracker runs (MLflow, W&B), so the next run
    in the same process (a search trial after a pruned one) can open its own."""
    if not accelerator.is_main_process:
        yield
        return
    lock = acquire_lock(run_dir)
    try:
        started = read_status(run_dir).get("started") or _now()  # kept across resumes
        write_status(run_dir, status="running", started=started, pid=os.getpid(),
                     host=socket.gethostname())
        try:
            yield
        except BaseException as e:
            for tracker in accelerator.trackers:
                tracker.finish()
            interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
            set_status(run_dir, "interrupted" if interrupted else "failed",
                       error=None if interrupted else f"{type(e).__name__}: {e}")
            raise
        set_status(run_dir, "finished", error=None)
    finally:
        lock.close()  # releases the flock


def acquire_lock(run_dir: Path):
    """An open file holding an exclusive flock on RUN/.lock; refuses a run trained elsewhere."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        st = read_status(run_dir)
        raise TunelabError(f"{run_dir} is being trained by another process (pid {st.get('pid')} "
                           f"on {st.get('host')}); wait for it or pick another run_dir") from None
    return handle


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (on this machine's view of the file)."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path) as handle:  # read-only: listing runs needs no write permission
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TunelabError(f"{path} is not valid JSON ({e})") from None


def write_status(run_dir: Path, **fields) -> None:
    atomic_write_json(Path(run_dir) / STATUS_FILE, fields)


def set_status(run_dir: Path, status: str, **fields) -> None:
    """Change the status, keeping what status.json already says (start, pid, host)."""
    write_status(run_dir, **{**read_status(run_dir), "status": status, "ended": _now(), **fields})


def status_of(run_dir: Path) -> str:
    """finished, running, failed, interrupted or pruned (see the module docstring)."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        return "finished"
    if is_locked(run_dir):
        return "running"
    st = read_status(run_dir)
    said = st.get("status")
    if said == "running":
        return "running" if st.get("host") not in (None, socket.gethostname()) else "interrupted"
    if said in ("failed", "interrupted", "pruned", "finished"):
        return said
    return "interrupted" if (run_dir / "metrics.jsonl").is_file() else "failed"


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# reading runs


def find_runs(root: str | Path) -> list[Path]:
    """Run directories under `root` (itself included), without descending into a run."""
    root = Path(root)
    if not root.is_dir():
        raise TunelabError(f"{root} is not a folder")
    found = []
    for folder, subdirs, files in os.walk(root):
        if "config.yaml" in files and "env.json" in files:
            found.append(Path(folder))
            subdirs.clear()
        else:
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return found


def check_run(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"{run_dir} is not a tunelab run (it has no config.yaml)")
    return run_dir


def read_config(run_dir: Path) -> dict:
    """The saved config as plain data: no validation, so a run from an older tunelab (or with a
    method since removed) still lists and diffs."""
    path = check_run(run_dir) / "config.yaml"
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TunelabError(f"{path} is not valid YAML: {e}") from None


def read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TunelabError(f"{path} is not valid JSON ({e})") from None


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl; a last line cut short by a killed process is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) and line.strip():
                raise TunelabError(f"{path}:{n} is not valid JSON") from None
    return records


def task_name(config: dict) -> str:
    task = config.get("task") or "classification"
    return task if isinstance(task, str) else task.get("name", "classification")


def task_metric(config: dict) -> str | None:
    """The metric that picked the run's best checkpoint (train.metric or the task's first)."""
    from tunelab.tasks import task_class, task_names

    chosen = (config.get("train") or {}).get("metric")
    if chosen or task_name(config) not in task_names():
        return chosen
    return task_class(task_name(config)).metrics[0]


def lower_is_better(config: dict, metric: str) -> bool:
    from tunelab.tasks import task_class, task_names
    from tunelab.tasks.base import Task

    name = task_name(config)
    cls = task_class(name) if name in task_names() else Task
    return metric in cls.lower_is_better


def summarize(run_dir: Path) -> dict:
    """One row of `tunelab runs list`."""
    config = read_config(run_dir)
    env = read_optional_json(run_dir / "env.json")
    results = read_optional_json(run_dir / "results.json")
    metric = task_metric(config)
    records = read_metrics(run_dir)
    row = {"run": str(run_dir), "status": status_of(run_dir), "task": task_name(config),
           "model": _short((config.get("model") or {}).get("name")),
           "method": (config.get("method") or {}).get("name"), "metric": metric,
           "validation": None, "test": None,
           "steps": max((r.get("step", 0) for r in records), default=0),
           "total_steps": env.get("total_steps"),
           "started": read_status(run_dir).get("started") or env.get("created"),
           "train_seconds": (results.get("train") or {}).get("seconds")}
    for split in ("validation", "test"):
        row[split] = (results.get(split) or {}).get(metric)
    if not results:  # still running or stopped: the best validation value logged so far
        seen = [r[metric] for r in records if r.get("split") == "validation" and metric in r]
        best = min if lower_is_better(config, metric) else max
        row["validation"] = best(seen) if seen else None
    return row


def _short(model: str | None) -> str | None:
    """A model path is shown by its last part; aliases and hub ids as they are."""
    if model and os.sep in model and Path(model).exists():
        return Path(model).name
    return model


LIST_COLUMNS = ("run", "status", "task", "model", "method", "metric", "validation", "test",
                "steps", "started", "train s")


def format_runs(rows: list[dict], root: Path) -> str:
    """A fixed-width table, oldest run first."""
    def cells(r: dict) -> list[str]:
        run = os.path.relpath(r["run"], root) if Path(r["run"]) != root else r["run"]
        steps = f"{r['steps']}/{r['total_steps']}" if r["total_steps"] else str(r["steps"])
        return [run, r["status"], r["task"] or "", r["model"] or "", r["method"] or "",
                r["metric"] or "", _num(r["validation"]), _num(r["test"]), steps,
                (r["started"] or "").replace("T", " ")[:16], _num(r["train_seconds"], 1)]

    table = [list(LIST_COLUMNS)] + [cells(r) for r in sorted(rows, key=lambda r: r["started"]
                                                               or "")]
    widths = [max(len(line[i]) for line in table) for i in range(len(LIST_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in table) + "\n"


def _num(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------
# one run


def describe(run_dir: Path) -> str:
    """`tunelab runs show`: what the run is, how it went, where its files are."""
    config = read_config(run_dir)
    env = read_optional_json(run_dir / "env.json")
    results = read_optional_json(run_dir / "results.json")
    st = read_status(run_dir)
    row = summarize(run_dir)
    train = config.get("train") or {}
    method = dict(config.get("method") or {})
    lines = [f"run          {run_dir.resolve()}",
             f"status       {row['status']}" + _status_detail(run_dir, row["status"], st),
             f"task         {row['task']} (metric {row['metric']})",
             f"model        {(config.get('model') or {}).get('name')}",
             f"method       {method.pop('name', None)} "
             + " ".join(f"{k}={_g(v)}" for k, v in method.items()),
             f"train        lr {_g(env.get('lr') or train.get('lr') or 'method default')}, "
             + (f"max_steps {train['max_steps']}" if train.get("max_steps")
                else f"epochs {train.get('epochs')}")
             + f", batch {train.get('batch_size')}x{train.get('grad_accum')}, seed "
               f"{train.get('seed')}, precision {env.get('precision', train.get('precision'))}"
             + f", steps {row['steps']}/{row['total_steps']}"]
    data = config.get("data") or {}
    hashes = env.get("data_hashes") or {}
    for split in ("train", "validation", "test"):
        if data.get(split):
            lines.append(f"data         {split}: {data[split]}"
                         + (f" (sha256 {hashes[split]})" if split in hashes else ""))
    lines.append(f"hashes       config {env.get('config_hash')}")
    lines.append(f"versions     tunelab {env.get('tunelab')} (git {env.get('git')}), torch "
                 f"{env.get('torch')}, transformers {env.get('transformers')}, peft "
                 f"{env.get('peft')}, on {env.get('device')}")
    lines += ["", "results"] + _results_lines(results, row)
    lines += ["", "files"] + _file_lines(run_dir)
    return "\n".join(lines) + "\n"


def _g(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _status_detail(run_dir: Path, status: str, st: dict) -> str:
    from tunelab.runs import latest_checkpoint

    if status == "running":
        return f" (pid {st.get('pid')} on {st.get('host')}, since {st.get('started')})"
    detail = f": {st['error']}" if status in ("failed", "pruned") and st.get("error") else ""
    if status != "finished":
        detail += (f" (continue it: tunelab train --resume {run_dir})"
                   if latest_checkpoint(run_dir) else " (no checkpoint was written)")
    return detail


def _results_lines(results: dict, row: dict) -> list[str]:
    if not results:
        best = row["validation"]
        return [f"  none yet; best validation {row['metric']} so far: {_num(best)}"]
    lines = []
    for split in ("validation", "test"):
        if split in results:
            lines.append(f"  {split:<11} " + "  ".join(
                f"{k} {int(v) if float(v).is_integer() and abs(v) > 1 else _num(v)}"  # counts
                for k, v in results[split].items() if isinstance(v, (int, float))))
    t = results.get("train") or {}
    if t:
        lines.append(f"  train       {t.get('steps')} steps (best {t.get('best_step')})"
                     f"{', stopped early' if t.get('stopped_early') else ''}, "
                     f"{t.get('seconds')} s, {_num(t.get('samples_per_s'), 1)} samples/s, "
                     f"{_num(t.get('trainable_percent'), 3)}% of {t.get('total_params')} "
                     f"parameters trained")
    return lines


def _file_lines(run_dir: Path) -> list[str]:
    lines = []
    for path in sorted(run_dir.iterdir()):
        if path.name.startswith("."):
            continue
        note = ""
        if path.is_dir():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            note = f"{size / 2**20:.2f} MB"
            if path.name == "state" and (path / "latest").is_file():
                note += f", resumable from {(path / 'latest').read_text().strip()}"
        elif path.name == "metrics.jsonl":
            note = f"{len(read_metrics(run_dir))} records"
        lines.append(f"  {path.name + ('/' if path.is_dir() else ''):<26} {note}".rstrip())
    return lines


# --------------------------------------------------------------------------------------------
# two runs


def flatten(tree, prefix: str = "") -> dict:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
                   else {f"{prefix}{key}": value})
    return out


def config_diff(run_a: Path, run_b: Path) -> list[tuple[str, object, object]]:
    """(key, value in A, value in B) for every config key that differs; run_dir is left out
    since it always does. A key only one run has shows as <unset> in the other."""
    a, b = (flatten(read_config(r)) for r in (run_a, run_b))
    return [(k, a.get(k, UNSET), b.get(k, UNSET)) for k in sorted(set(a) | set(b))
            if k != "run_dir" and a.get(k, UNSET) != b.get(k, UNSET)]


def env_diff(run_a: Path, run_b: Path) -> list[tuple[str, object, object]]:
    """The same for env.json: versions, hardware, data hashes (the time written is left out)."""
    a, b = (flatten(read_optional_json(r / "env.json")) for r in (run_a, run_b))
    return [(k, a.get(k, UNSET), b.get(k, UNSET)) for k in sorted(set(a) | set(b))
            if k not in ("created", "config_hash") and a.get(k, UNSET) != b.get(k, UNSET)]


UNSET = "<unset>"


def format_diff(run_a: Path, run_b: Path) -> str:
    config, env = config_diff(run_a, run_b), env_diff(run_a, run_b)
    out = [f"A = {run_a}", f"B = {run_b}", ""]
    for title, rows in (("config", config), ("environment", env)):
        if not rows:
            out.append(f"{title}: identical")
            continue
        table = [("key", "A", "B")] + [(k, _show(va), _show(vb)) for k, va, vb in rows]
        widths = [max(len(line[i]) for line in table) for i in range(3)]
        out.append(f"{title}:")
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                for line in table]
    return "\n".join(out) + "\n"


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------------------------
# curves of several runs


def curves(run_dir: Path, metric: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(training loss by step, validation `metric` by step) from metrics.jsonl."""
    records = read_metrics(run_dir)
    loss = [(r["step"], r["loss"]) for r in records if "split" not in r and "loss" in r]
    val = [(r["step"], r[metric]) for r in records
           if r.get("split") == "validation" and metric in r]
    return loss, val


def plot_runs(run_dirs: list[Path], metric: str | None, out: Path) -> tuple[str, list[dict]]:
    """Training loss and validation `metric` of every run in one PNG (two panels).

    `metric` unset: the first run's task metric. Returns the metric and per run its best
    validation value and step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or task_metric(read_config(run_dirs[0])) or "loss"
    data = {r: curves(check_run(r), metric) for r in run_dirs}
    if not any(val for _, val in data.values()):
        seen = sorted({k for r in run_dirs for rec in read_metrics(r)
                       if rec.get("split") == "validation" for k in rec} - {"step", "split",
                                                                           "best"})
        raise TunelabError(f"no run logged a validation {metric!r}; logged: "
                           f"{', '.join(seen) or 'no validation at all'}")
    names = _labels(run_dirs)
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2))
    summary = []
    lower = lower_is_better(read_config(run_dirs[0]), metric)
    for run, name in zip(run_dirs, names):
        loss, val = data[run]
        color, best = None, (None, None)
        if loss:
            color = ax_loss.plot(*zip(*loss), label=name)[0].get_color()
        if val:
            ax_val.plot(*zip(*val), marker="o", markersize=3, label=name, color=color)
            best = (min if lower else max)(val, key=lambda step_value: step_value[1])
        summary.append({"run": name, "best": best[1], "best_step": best[0],
                        "final_loss": loss[-1][1] if loss else None})
    ax_loss.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    ax_val.set(title=f"validation {metric}", xlabel="optimizer step", ylabel=metric)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return metric, summary


def _labels(run_dirs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two names collide (trial-000 of two searches)."""
    names = [Path(r).name for r in run_dirs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, run_dirs)]
