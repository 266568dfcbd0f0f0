"""Every adaptation method on one task with `tunelab compare`; the table and the plot go to
docs/benchmarks.md (section compare_<task>) and docs/compare_<task>.png.

    .venv/bin/python bench/compare_methods.py                      # SST-2, MiniLM, all methods
    .venv/bin/python bench/compare_methods.py --task eprstmt       # FewCLUE eprstmt, gemma3-270m

Each method trains in its own process on the same rows and seed with its own default learning
rate (see docs/methods.md); the step budget is given by --epochs / --train-rows.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

from common import (REPO_ROOT, add_common_args, command_line, machine_info, machine_line, now,
                    update_markdown_section, write_json)

TASKS = {
    "sst2": {"recipe": "configs/minilm/sst2_full.yaml", "data": "sst2",
             "files": {"train": "train.txt", "validation": "dev.txt", "test": "test.txt"},
             "title": "SST-2 (English sentiment), MiniLM-L6"},
    "eprstmt": {"recipe": "configs/gemma3/eprstmt_lora.yaml", "data": "fewclue/eprstmt",
                "files": {"train": "train_few_all.json", "validation": "dev_few_all.json",
                          "test": "test_public.json"},
                "title": "FewCLUE eprstmt (Chinese sentiment, 160 training rows), Gemma-3-270M"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="sst2")
    parser.add_argument("--methods", help="comma-separated (default: all the model supports)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--train-rows", type=int, help="stratified subset of the training rows")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides")
    known, _ = parser.parse_known_args()
    add_common_args(parser, f"compare_{known.task}")
    args = parser.parse_args()
    task = TASKS[args.task]
    data = args.data_dir / task["data"]
    overrides = [f"data.{split}={data / name}" for split, name in task["files"].items()]
    overrides += [f"train.epochs={args.epochs}", "train.tracker=none", "train.eval_every=null"]
    if args.train_rows:
        overrides.append(f"data.max_train_rows={args.train_rows}")
    overrides += args.extra
    out = REPO_ROOT / "bench" / "results" / f"compare_{args.task}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "tunelab", "compare", task["recipe"], *overrides, "--out", str(out)]
    if args.methods:
        cmd += ["--methods", args.methods]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    if not (out / "comparison.json").exists():
        print("compare wrote no results", file=sys.stderr)
        return 1
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    info = machine_info()
    write_json(args.out, {"command": command_line(), "date": now(), "machine": info,
                          "seconds": seconds, "overrides": overrides, "rows": rows})
    if args.markdown:
        png = REPO_ROOT / "docs" / f"compare_{args.task}.png"
        shutil.copy(out / "comparison.png", png)
        body = (f"## Methods compared: {task['title']}\n\n"
                f"`{command_line()}` — {now()}, {machine_line(info)}; "
                f"{args.epochs:g} epoch(s), total {seconds / 60:.1f} min.\n\n"
                + (out / "comparison.md").read_text()
                + f"\n![metric vs trainable parameters]({png.name})\n")
        update_markdown_section(args.markdown, f"compare_{args.task}", body)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
