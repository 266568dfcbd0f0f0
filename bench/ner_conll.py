"""Named-entity recognition on CoNLL-2003 with the recipe configs/minilm/conll2003_ner.yaml.

Trains MiniLM-L6 (full fine-tuning) on the shared CoNLL-2003 files in a child process (so the
peak RSS is the training's own) and reports test entity F1/precision/recall (micro, conlleval
semantics), F1 per entity type, training seconds, real tokens/s and peak RSS.

    .venv/bin/python bench/ner_conll.py                        # full size (what the docs show)
    .venv/bin/python bench/ner_conll.py --max-train-rows 200 --epochs 1 --markdown '' \\
        --out /tmp/ner_conll.json                               # a smoke run (~1 min)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "ner_conll"
RECIPE = common.REPO_ROOT / "configs" / "minilm" / "conll2003_ner.yaml"
FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("--epochs", type=float, default=None,
                        help="training epochs (default: the recipe's)")
    parser.add_argument("--max-train-rows", type=int, default=None,
                        help="train on a sample of N sentences (smoke runs; default all)")
    parser.add_argument("--child", nargs=2, metavar=("JOB_JSON", "OUT_JSON"),
                        help=argparse.SUPPRESS)  # internal: run the training
    return parser.parse_args(argv)


def overrides(args, run_dir: Path) -> list[str]:
    data = args.data_dir / "conll2003"
    missing = [str(data / name) for name in FILES.values() if not (data / name).is_file()]
    if missing:
        raise SystemExit(f"CoNLL-2003 files missing: {', '.join(missing)} (set --data-dir)")
    out = [f"data.{split}={data / name}" for split, name in FILES.items()]
    out += ["train.tracker=none", f"run_dir={run_dir}"]
    if args.epochs is not None:
        out.append(f"train.epochs={args.epochs}")
    if args.max_train_rows is not None:
        out.append(f"data.max_train_rows={args.max_train_rows}")
    return out


def markdown(report: dict) -> str:
    r, cfg = report["results"], report["config"]
    t, test = r["train"], r["test"]
    splits = report["preflight"]["splits"]
    types = report["preflight"]["types"]
    lines = ["## Named entities: CoNLL-2003 (English NER), MiniLM-L6, full fine-tuning", "",
             f"`{report['command']}`", "",
             f"{report['date']}; {common.machine_line(report['machine'])}.", "",
             f"Recipe `{report['recipe']}`: {splits['train']['sentences']:,} training sentences "
             f"× {cfg['train']['epochs']:g} epoch(s), batch {cfg['train']['batch_size']}, lr "
             f"{cfg['train']['lr']:g}, warm-up {cfg['train']['warmup_ratio']:.0%} + linear "
             f"decay, max length {cfg['model']['max_length']}, {t['precision']}; "
             f"{t['steps']:,} steps, best validation F1 at step {t['best_step']}. Entity-level "
             f"micro scores (conlleval semantics, as seqeval) on the test set "
             f"({splits['test']['sentences']:,} sentences, {test['entities']:,} entities; "
             f"words cut by the max length count as O).", ""]
    rows = [[split, f"{r[split]['f1']:.4f}", f"{r[split]['precision']:.4f}",
             f"{r[split]['recall']:.4f}", f"{r[split]['token_accuracy']:.4f}"]
            for split in ("validation", "test") if split in r]
    lines += [common.markdown_table(["split", "entity F1", "precision", "recall",
                                     "token accuracy"], rows), ""]
    lines += [common.markdown_table(["test F1 by type"] + types,
                                    [["F1"] + [f"{test.get(f'f1_{k}', 0.0):.4f}"
                                               for k in types]]), ""]
    lines += [common.markdown_table(
        ["train s", "tagged words/s", "real tokens/s", "peak RSS MB", "trainable params"],
        [[common.fmt(t["seconds"]), common.fmt(t["samples_per_s"]),
          common.fmt(t["tokens_per_s"], 0), common.fmt(report["peak_rss_mb"], 0),
          f"{t['trainable_params']:,}"]]), "",
        "Seconds count the optimizer steps only (not loading or evaluation); tagged words are "
        "the first sub-tokens, which carry the loss; tokens/s counts real (non-padding) tokens; "
        "peak RSS is the whole training process."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        common.train_job(*args.child)
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        result, child = common.train_in_child(__file__, RECIPE,
                                              overrides(args, Path(tmp) / "run"), Path(tmp), NAME)
        if result is None:
            return 1
    report = {"benchmark": NAME, "command": common.command_line(), "date": common.now(),
              "machine": common.machine_info(), "recipe": str(RECIPE.relative_to(common.REPO_ROOT)),
              **result, "peak_rss_mb": round(child.peak_rss_mb, 1),
              "process_seconds": round(child.wall_seconds, 1),
              "benchmark_seconds": round(time.perf_counter() - started, 1)}
    common.write_json(args.out, report)
    text = markdown(report)
    print(text)
    if args.markdown:
        common.update_markdown_section(args.markdown, NAME, text)
    print(f"\nwrote {args.out}" + (f" and {args.markdown}" if args.markdown else "")
          + f" in {report['benchmark_seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
