"""Few-shot table: every method of `tunelab fewshot-eval` on SST-2, AG News, FewCLUE eprstmt
and tnews, k = 8 and 16 examples per class, mean ± std over seeds 0, 1, 2.

Each data set is one `tunelab fewshot-eval` run (the commands below, output under
bench/results/fewshot-<name>/). This script runs each; fewshot-eval keeps the runs an earlier
call finished, so a stopped benchmark continues where it stopped (--rerun: all again, with
--fresh; results written before fewshot-eval recorded its settings count as finished). It then
writes one table of them all.

    .venv/bin/python bench/fewshot.py                 # ~2 h on an idle 2-core machine
    .venv/bin/python bench/fewshot.py --only sst2     # one data set
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "fewshot"
SEEDS = "0,1,2"
NLI_RUN = "bench/results/fewshot-nli-rte-run"
"""MiniLM fine-tuned on RTE (configs/minilm/rte_full.yaml): the nli zero-shot scorer."""
RUNS = {
    # name: (data set, model, fewshot-eval arguments after the verb)
    "agnews": ("AG News", "MiniLM-L6", [
        "configs/fewshot/agnews.yaml", "--methods", "zeroshot,finetune,setfit", "--k", "8,16",
        "--seeds", SEEDS, "--label-file", "configs/fewshot/agnews_labels.yaml"]),
    "agnews-prompt": ("AG News", "SmolLM2-135M + LoRA", [
        "configs/fewshot/agnews_prompt.yaml", "prompt.epochs=10", "--methods", "prompt",
        "--k", "8", "--seeds", SEEDS]),
    "agnews-lm-zeroshot": ("AG News", "SmolLM2-135M", [
        "configs/fewshot/agnews_prompt.yaml", "--methods", "zeroshot", "--k", "8",
        "--seeds", "0"]),
    "sst2": ("SST-2", "MiniLM-L6", [
        "configs/fewshot/sst2.yaml", "selftrain.rounds=1", "--methods",
        "zeroshot,finetune,setfit,selftrain", "--k", "8,16", "--seeds", SEEDS]),
    "sst2-prompt": ("SST-2", "SmolLM2-135M + LoRA", [
        "configs/fewshot/sst2_prompt.yaml", "prompt.epochs=10", "--methods", "prompt,zeroshot",
        "--k", "8,16", "--seeds", SEEDS]),
    "eprstmt": ("eprstmt (zh)", "MiniLM-L6", [
        "configs/fewshot/eprstmt.yaml", "selftrain.rounds=1", "--methods",
        "finetune,setfit,selftrain", "--k", "8,16", "--seeds", SEEDS]),
    "eprstmt-zeroshot": ("eprstmt (zh)", "Gemma-3-270M", [
        "configs/fewshot/eprstmt_prompt.yaml", "--methods", "zeroshot", "--k", "8", "--seeds", "0",
        "--label-file", "configs/fewshot/eprstmt_labels.yaml"]),
    "eprstmt-prompt": ("eprstmt (zh)", "Gemma-3-270M + LoRA", [
        "configs/fewshot/eprstmt_prompt.yaml", "prompt.epochs=10", "--methods", "prompt",
        "--k", "8", "--seeds", SEEDS]),
    "eprstmt-prompt-k16": ("eprstmt (zh)", "Gemma-3-270M + LoRA", [
        "configs/fewshot/eprstmt_prompt.yaml", "prompt.epochs=10", "--methods", "prompt",
        "--k", "16", "--seeds", SEEDS]),
    "tnews": ("tnews (zh)", "MiniLM-L6", [
        "configs/fewshot/tnews.yaml", "--methods", "finetune,setfit", "--k", "8",
        "--seeds", SEEDS]),  # k = 16 is 240 examples: SetFit's 4,800 pairs take ~5 min a seed
    "tnews-k16": ("tnews (zh)", "MiniLM-L6", [
        "configs/fewshot/tnews.yaml", "--methods", "finetune", "--k", "16", "--seeds", SEEDS]),
    "eprstmt-selftrain-k16": ("eprstmt (zh)", "MiniLM-L6", [
        "configs/fewshot/eprstmt.yaml", "selftrain.rounds=1", "--methods", "selftrain",
        "--k", "16", "--seeds", SEEDS]),
    "agnews-prompt-k16": ("AG News", "SmolLM2-135M + LoRA", [
        "configs/fewshot/agnews_prompt.yaml", "prompt.epochs=10", "--methods", "prompt",
        "--k", "16", "--seeds", SEEDS]),
    "tnews-setfit-k16": ("tnews (zh)", "MiniLM-L6", [
        "configs/fewshot/tnews.yaml", "--methods", "setfit", "--k", "16", "--seeds", SEEDS]),
    "sst2-nli": ("SST-2", "MiniLM-L6 RTE run", [
        "configs/fewshot/sst2.yaml", f"model.name={NLI_RUN}", "zeroshot.scorer=nli",
        "--methods", "zeroshot", "--k", "8", "--seeds", "0"]),
    "agnews-nli": ("AG News", "MiniLM-L6 RTE run", [
        "configs/fewshot/agnews.yaml", f"model.name={NLI_RUN}", "zeroshot.scorer=nli",
        "--methods", "zeroshot", "--k", "8", "--seeds", "0",
        "--label-file", "configs/fewshot/agnews_labels.yaml"]),
    "agnews-selftrain": ("AG News", "MiniLM-L6", [
        "configs/fewshot/agnews.yaml", "selftrain.rounds=1", "--methods", "selftrain",
        "--k", "8,16", "--seeds", SEEDS]),
    "tnews-zeroshot": ("tnews (zh)", "Gemma-3-270M", [
        "configs/fewshot/tnews_prompt.yaml", "--methods", "zeroshot", "--k", "8", "--seeds", "0",
        "--label-file", "configs/fewshot/tnews_labels.yaml"]),
    "tnews-prompt": ("tnews (zh)", "Gemma-3-270M + LoRA", [
        "configs/fewshot/tnews_prompt.yaml", "--methods", "prompt", "--k", "8",
        "--seeds", SEEDS]),
    "tnews-selftrain": ("tnews (zh)", "MiniLM-L6", [
        "configs/fewshot/tnews.yaml", "selftrain.rounds=1", "--methods", "selftrain",
        "--k", "8", "--seeds", SEEDS]),
    "tnews-prompt-k16": ("tnews (zh)", "Gemma-3-270M + LoRA", [
        "configs/fewshot/tnews_prompt.yaml", "--methods", "prompt", "--k", "16",
        "--seeds", SEEDS]),
    "tnews-selftrain-k16": ("tnews (zh)", "MiniLM-L6", [
        "configs/fewshot/tnews.yaml", "selftrain.rounds=1", "--methods", "selftrain",
        "--k", "16", "--seeds", SEEDS]),
}
PREREQUISITES = {
    # run: the `tunelab train` it needs first (skipped when its run directory is complete)
    "sst2-nli": ["train", "configs/minilm/rte_full.yaml", "train.tracker=none",
                 f"run_dir={NLI_RUN}"],
}
PREREQUISITES["agnews-nli"] = PREREQUISITES["sst2-nli"]
METHOD_NAMES = {"zeroshot": "zero-shot", "finetune": "plain fine-tuning",
                "setfit": "contrastive (SetFit)", "selftrain": "SetFit + self-training",
                "prompt": "prompt-based (PET/LM-BFF)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, NAME)
    parser.add_argument("--only", default=",".join(RUNS), help="comma-separated data sets")
    parser.add_argument("--rerun", action="store_true", help="run even where results exist")
    args = parser.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in RUNS]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    return args


def out_dir(name: str) -> Path:
    return common.REPO_ROOT / "bench" / "results" / f"fewshot-{name}"


def command(name: str) -> list[str]:
    return ["tunelab", "fewshot-eval", *RUNS[name][2], "--out", f"bench/results/fewshot-{name}"]


def run(name: str, fresh: bool = False) -> None:
    needs = PREREQUISITES.get(name)
    if needs:
        run_dir = next(a[len("run_dir="):] for a in needs if a.startswith("run_dir="))
        if not (common.REPO_ROOT / run_dir / "results.json").is_file():
            tunelab(needs)
    tunelab([*command(name)[1:], *(["--fresh"] if fresh else [])])


def tunelab(args: list[str]) -> None:
    """`tunelab ARGS` in a child process; a failure stops the benchmark with its output."""
    print(f"[{NAME}] tunelab {' '.join(args)}", file=sys.stderr, flush=True)
    child = common.run_child([sys.executable, "-m", "tunelab", *args])
    if child.returncode != 0:
        raise SystemExit(f"tunelab {' '.join(args)} failed (exit code {child.returncode}):\n"
                         f"{child.output_tail[-3000:]}")


def table(names: list[str]) -> tuple[list[str], list[list[str]]]:
    """Rows: data set, model, method; columns: k = 0 (zero-shot), 8, 16. Runs of the same data
    set, model and method (say k = 8 in one fewshot-eval, k = 16 in another) share a row."""
    rows: dict[tuple, dict] = {}
    for name in names:
        results = json.loads((out_dir(name) / "results.json").read_text())
        dataset, model, _ = RUNS[name]
        args = RUNS[name][2]
        listed = args[args.index("--methods") + 1].split(",")
        by_method: dict[str, dict[int, dict]] = {}
        for s in results["summary"]:
            if s["method"] in listed:  # what the command shown runs (its folder may hold more)
                by_method.setdefault(s["method"], {})[s["k"]] = s
        for method, by_k in by_method.items():
            label = METHOD_NAMES.get(method, method)
            if method == "zeroshot":
                zs = results["zeroshot"]
                label += (" (LM scoring, calibrated)" if zs["scorer"] == "lm" and zs["calibrate"]
                          else f" ({zs['scorer']})")
            shown = model.split(" + ")[0] if method == "zeroshot" else model  # no adapter
            row = rows.setdefault((dataset, shown, label), {"test": results["test"], "cells": {},
                                                            "seconds": 0.0})
            for k in (8, 16):
                s = by_k.get(0 if method == "zeroshot" else k)
                if s:
                    few = method != "zeroshot" and s["seeds"] < len(SEEDS.split(","))
                    row["cells"][k] = (f"{s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f}"
                                       + (f" ({s['seeds']} of {len(SEEDS.split(','))} seeds)"
                                          if few else ""))
            row["seconds"] = max(row["seconds"], *(s["seconds_mean"] for s in by_k.values()))
    return (["data", "model", "method", "test rows", "k = 8", "k = 16", "s per run"],
            [[*key, f"{r['test']:,}", r["cells"].get(8, "—"), r["cells"].get(16, "—"),
              f"{r['seconds']:.0f}"] for key, r in sorted(rows.items(), key=by_data_set)])


def by_data_set(item) -> int:
    """Table rows grouped by data set, in the order RUNS first names them."""
    return list(dict.fromkeys(dataset for dataset, _, _ in RUNS.values())).index(item[0][0])


def markdown(names: list[str], report: dict) -> str:
    headers, rows = table(names)
    needed = list(dict.fromkeys(" ".join(PREREQUISITES[n]) for n in names if n in PREREQUISITES))
    commands = "\n".join([*(f"    tunelab {c}" for c in needed),
                          *(f"    {' '.join(command(n))}" for n in names)])
    return "\n".join([
        "## Few-shot: zero-shot, plain fine-tuning, SetFit, prompt-based, self-training", "",
        "`.venv/bin/python bench/fewshot.py` runs, for each data set:", "", commands, "",
        f"{report['date']}; {common.machine_line(report['machine'])}.", "",
        "Test accuracy, mean ± standard deviation over seeds 0, 1, 2 (each seed draws its own k "
        "examples per class from the pool and seeds the training); zero-shot learns nothing, so "
        "its one figure stands in both columns (similarity: MiniLM embeddings against \"This "
        "review is {}.\" / \"This news article is about {}.\" with the label names or "
        "descriptions; LM scoring: the label word's probability after the prompt, with "
        "contextual calibration; NLI: the entailment probability of \"This review is {label}.\" "
        "/ \"This news article is about {label}.\" after the text, from MiniLM fine-tuned on "
        "RTE's train.tsv (2,127 pairs; configs/minilm/rte_full.yaml, RTE test accuracy 0.55)). "
        "Pools and test sets: SST-2 train.txt / test.txt; AG News test.tsv split into two "
        "stratified halves; FewCLUE train_few_all / test_public. Self-training: one round, the most "
        "confident pseudo-labels per class (32; tnews 16) from 3,000 unlabelled rows (SST-2 "
        "train.txt without its labels; AG News the pool half without its labels; FewCLUE "
        "unlabeled.json). Prompt-based (LoRA r=8): SST-2 \"Review: {text}\\nSentiment:\" → "
        "negative / positive; AG News \"Article: {text}\\nTopic:\" → world or politics / "
        "sports / business / technology or science (10 epochs); eprstmt two patterns ensembled "
        "→ 差 / 好 (10 epochs); tnews \"新闻：{text}\\n类别：\" → the topics' Chinese names "
        "(20 epochs) (configs/fewshot/*_prompt.yaml). Seconds per run are wall time on the "
        "2-core machine, at times shared with other jobs: a guide, not a benchmark.", "",
        common.markdown_table(headers, rows),
        *(["", "— : not measured (" + "; ".join(
            f"{r[2]} on {r[0]}, k = {k}" for r in rows for k, cell in ((8, r[4]), (16, r[5]))
            if cell == "—") + ": left out for time)."] if any("—" in r for r in rows) else []),
        *(["", "Not run yet (no results): " + "; ".join(
            f"{RUNS[n][2][RUNS[n][2].index('--methods') + 1]} on {RUNS[n][0]} with {RUNS[n][1]}"
            f" (`--only {n}`)" for n in RUNS if n not in names) + "."]
          if set(RUNS) - set(names) else [])])


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    for name in args.only:
        done = out_dir(name) / "results.json"
        if args.rerun or not done.is_file() or "settings" in json.loads(done.read_text()):
            run(name, fresh=args.rerun)  # fewshot-eval itself skips the runs already done
    names = [n for n in RUNS if (out_dir(n) / "results.json").is_file()]
    report = {"benchmark": NAME, "command": common.command_line(), "date": common.now(),
              "machine": common.machine_info(),
              "results": {n: json.loads((out_dir(n) / "results.json").read_text())["summary"]
                          for n in names},
              "benchmark_seconds": round(time.perf_counter() - started, 1)}
    common.write_json(args.out, report)
    text = markdown(names, report)
    print(text)
    if args.markdown:
        common.update_markdown_section(args.markdown, NAME, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
