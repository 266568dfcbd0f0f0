"""Sentence-pair classification (NLI): GLUE RTE (English, 2 classes) and FewCLUE OCNLI
(Chinese, 3 classes), each trained from its recipe in a child process, test accuracy reported.

    .venv/bin/python bench/nli.py                         # both recipes (what the docs show)
    .venv/bin/python bench/nli.py --recipe configs/minilm/rte_full.yaml
    .venv/bin/python bench/nli.py --max-train-rows 64 --epochs 1 --markdown '' \\
        --out /tmp/nli.json                                # a smoke run

Recipes name their data as ../shared/data/...; --data-dir rewrites that prefix.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "nli"
RECIPES = ["configs/minilm/rte_full.yaml", "configs/gemma3/ocnli_lora.yaml"]
SHARED_PREFIX = "../shared/data/"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("--recipe", action="append", default=None,
                        help=f"recipe to run (repeatable; default: {', '.join(RECIPES)})")
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--max-train-rows", type=int, default=None)
    parser.add_argument("--child", nargs=2, metavar=("JOB_JSON", "OUT_JSON"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def overrides(args, recipe: Path, run_dir: Path) -> list[str]:
    import yaml

    data = (yaml.safe_load(recipe.read_text()) or {}).get("data", {})
    out = [f"data.{key}={args.data_dir / value[len(SHARED_PREFIX):]}"
           for key, value in data.items()
           if isinstance(value, str) and value.startswith(SHARED_PREFIX)]
    out += ["train.tracker=none", f"run_dir={run_dir}"]
    if args.epochs is not None:
        out.append(f"train.epochs={args.epochs}")
    if args.max_train_rows is not None:
        out.append(f"data.max_train_rows={args.max_train_rows}")
    return out


def run_recipe(args, recipe: Path) -> dict | None:
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        result, child = common.train_in_child(__file__, recipe,
                                              overrides(args, recipe, Path(tmp) / "run"),
                                              Path(tmp), NAME)
    if result is None:
        return None
    return {"recipe": str(recipe.relative_to(common.REPO_ROOT)), **result,
            "peak_rss_mb": round(child.peak_rss_mb, 1), "seconds": round(child.wall_seconds, 1)}


def markdown(report: dict) -> str:
    lines = ["## Sentence pairs (NLI): RTE and OCNLI", "", f"`{report['command']}`", "",
             f"{report['date']}; {common.machine_line(report['machine'])}.", "",
             "Each recipe trains once (seed 42); the best validation accuracy's weights are "
             "tested. Chance is 0.5 on RTE and 0.333 on OCNLI (balanced test sets).", ""]
    rows = []
    for r in report["runs"]:
        cfg, res, splits = r["config"], r["results"], r["preflight"]["splits"]
        test = res.get("test", {})
        rows.append([f"`{r['recipe']}`", cfg["model"]["name"], cfg["method"]["name"],
                     f"{splits['train']['rows']:,}", f"{cfg['train']['epochs']:g}",
                     f"{res.get('validation', {}).get('accuracy', float('nan')):.4f}",
                     f"{test.get('accuracy', float('nan')):.4f}",
                     f"{test.get('macro_f1', float('nan')):.4f}",
                     common.fmt(res["train"]["seconds"]), common.fmt(r["peak_rss_mb"], 0)])
    lines.append(common.markdown_table(
        ["recipe", "model", "method", "train rows", "epochs", "val. acc.", "test acc.",
         "test macro-F1", "train s", "peak RSS MB"], rows))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        common.train_job(*args.child)
        return 0
    started = time.perf_counter()
    runs = [run_recipe(args, (common.REPO_ROOT / r).resolve()) for r in args.recipe or RECIPES]
    report = {"benchmark": NAME, "command": common.command_line(), "date": common.now(),
              "machine": common.machine_info(), "runs": [r for r in runs if r is not None],
              "benchmark_seconds": round(time.perf_counter() - started, 1)}
    common.write_json(args.out, report)
    text = markdown(report)
    print(text)
    if args.markdown and report["runs"]:
        common.update_markdown_section(args.markdown, NAME, text)
    return 0 if all(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
