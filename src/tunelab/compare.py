"""`tunelab compare`: train one recipe with several methods on the same data and seed, then
tabulate accuracy against what each method costs (trainable parameters, stored size, time,
memory). Each method runs in its own process, so a crash or an out-of-memory in one is reported
in the table and the others still finish, and peak memory is measured per method."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tunelab.config import resolve_config
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from tunelab.methods import registry

COLUMNS = ["method", "status", "validation", "test", "trainable", "trainable_percent",
           "artifact_mb", "train_seconds", "samples_per_s", "peak_rss_mb", "lr", "error"]


def supported_methods(config) -> list[str]:
    from tunelab import models

    family = models.model_family(models.load_config(models.resolve_model(config.model.name)))
    return [m.name for m in registry.all_methods()
            if family in m.families and config.task.name in m.tasks]


def compare(recipe: str | None, overrides: list[str], methods: list[str] | None,
            out_dir: str | Path) -> list[dict]:
    from tunelab.tasks import get_task

    base = resolve_config(recipe, overrides)  # validates the recipe once, up front
    metric = get_task(base).metric
    methods = methods or supported_methods(base)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {name} ...", file=sys.stderr, flush=True)
        row = run_method(recipe, overrides, name, out_dir / name, metric)
        rows.append(row)
        status = (f"{metric} {row['test'] if row['test'] is not None else row['validation']}"
                  if row["status"] == "ok" else f"FAILED: {row['error']}")
        print(f"[{i}/{len(methods)}] {name}: {status} ({row['train_seconds']} s)", file=sys.stderr,
              flush=True)
        write_outputs(rows, out_dir, metric)
    return rows


def run_method(recipe, overrides, name: str, run_dir: Path, metric: str) -> dict:
    """Train one method in a child process and read its results back."""
    args = [sys.executable, "-m", "tunelab", "train"] + ([recipe] if recipe else [])
    args += [o for o in overrides if not o.startswith(("method.", "run_dir="))]
    if recipe and not _recipe_method_is(recipe, name):
        args.append("method=null")  # the recipe's method settings belong to another method
    args += [f"method.name={name}", f"run_dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    row = {c: None for c in COLUMNS} | {"method": name}
    row["train_seconds"] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        row.update(status="failed", error=(lines[-1] if lines else f"exit {proc.returncode}")[:300])
        atomic_write_text(run_dir.parent / f"{name}.log", proc.stderr)
        return row
    results = json.loads((run_dir / "results.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    train = results["train"]
    row.update(status="ok", validation=_metric(results, "validation", metric),
               test=_metric(results, "test", metric), trainable=train["trainable_params"],
               trainable_percent=round(train["trainable_percent"], 4),
               artifact_mb=round(artifact_bytes(run_dir) / 2**20, 4),
               train_seconds=round(train["seconds"], 1),
               samples_per_s=round(train["samples_per_s"], 1),
               peak_rss_mb=round(train["peak_rss_mb"]), lr=env.get("lr"))
    return row


def _recipe_method_is(recipe: str, name: str) -> bool:
    from tunelab.config import load_recipe

    section = load_recipe(recipe).get("method") or {}
    return section.get("name", "full") == name


def _metric(results: dict, split: str, metric: str):
    value = results.get(split, {}).get(metric)
    return round(value, 4) if value is not None else None


def artifact_bytes(run_dir: Path) -> int:
    """What a user ships: model/ for full fine-tuning, adapter/ otherwise."""
    folder = run_dir / "model" if (run_dir / "model").is_dir() else run_dir / "adapter"
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_outputs(rows: list[dict], out_dir: Path, metric: str) -> None:
    atomic_write_json(out_dir / "comparison.json", {"metric": metric, "rows": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "comparison.csv", buf.getvalue())
    atomic_write_text(out_dir / "comparison.md", markdown_table(rows, metric))
    if any(r["status"] == "ok" for r in rows):
        plot(rows, out_dir / "comparison.png", metric)


def markdown_table(rows: list[dict], metric: str) -> str:
    head = (f"| method | validation {metric} | test {metric} | trainable params | trainable % "
            f"| stored MB | train s | samples/s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {_fmt(r['validation'])} | {_fmt(r['test'])} | "
                     f"{r['trainable']:,} | {r['trainable_percent']:.3g} | {r['artifact_mb']} | "
                     f"{r['train_seconds']} | {r['samples_per_s']} | {r['peak_rss_mb']} |")
    return head + "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def plot(rows: list[dict], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        y = r["test"] if r["test"] is not None else r["validation"]
        ax.scatter(r["trainable_percent"], y)
        ax.annotate(r["method"], (r["trainable_percent"], y), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (%, log scale)")
    ax.set_ylabel(f"{'test' if any(r['test'] is not None for r in ok) else 'validation'} {metric}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def parse_methods(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise TunelabError("--methods needs a comma-separated list, e.g. full,lora")
    return names
