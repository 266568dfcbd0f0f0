"""The `tunelab` command: a table of verbs.

    tunelab train [RECIPE.yaml] [key.sub=value ...] [--resume RUN_DIR]
    tunelab pretrain [RECIPE.yaml] [key.sub=value ...] [--resume RUN_DIR]   masked/causal LM
    tunelab check [RECIPE.yaml] [key.sub=value ...]     preflight only: data counts, problems
    tunelab eval RUN_DIR --data FILE
    tunelab predict RUN_DIR|EXPORT_DIR --input FILE --output FILE
    tunelab generate RUN_DIR|MODEL --prompt TEXT [--prompt ...] [--system TEXT]
    tunelab chat RUN_DIR|MODEL                            a conversation on the terminal
    tunelab compare [RECIPE.yaml] [key=value ...] --methods full,lora,...
    tunelab search RECIPE.yaml [key=value ...] --space SPACE.yaml --trials N   (Optuna)
    tunelab runs list [DIR] | show RUN | diff RUN_A RUN_B | compare RUN ... --out PNG
    tunelab export RUN_DIR --to merged|adapter|onnx|int8
    tunelab verify RUN_DIR [EXPORT_DIR ...] [--url http://HOST:PORT [--model NAME]]
    tunelab serve RUN_DIR|EXPORT_DIR|NAME=DIR ... [--port 8000] [--api-key KEY]   HTTP API
    tunelab ui [--runs DIR] [--recipes DIR] [--port 7860]   local dashboard: runs, curves, train
    tunelab monitor --run RUN --input FILE|- [--topic-column C] [--window 1h] [--follow]
    tunelab explain RUN_DIR --text TEXT [--text ...] [--method ig|gxi]   token attributions
    tunelab zeroshot --model MODEL|RUN_DIR --data FILE (--labels a,b | --label-file F)
    tunelab fewshot-eval RECIPE.yaml [key=value ...] --methods setfit,prompt,selftrain,... --k 8,16
    tunelab self-train RECIPE.yaml [key=value ...] --unlabelled FILE --rounds N --out DIR
    tunelab select RUN_DIR --data FILE --n N [--strategy hybrid] --out FILE   rows to label next
    tunelab methods                                      the method support matrix
    tunelab config                                       every config key with its doc
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tunelab.errors import TunelabError


def cmd_train(args) -> None:
    from tunelab.config import resolve_config
    from tunelab.train.loop import train

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    if args.resume:
        if recipe or overrides:
            raise TunelabError("--resume continues a run with its saved config.yaml; "
                               "give no recipe or overrides with it")
        config = None
    else:
        config = resolve_config(recipe, overrides)
    train(config, resume=args.resume)



def cmd_pretrain(args) -> None:
    from tunelab.pretrain import pretrain_config
    from tunelab.train.loop import train

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    if args.resume:
        if recipe or overrides:
            raise TunelabError("--resume continues a run with its saved config.yaml; "
                               "give no recipe or overrides with it")
        train(None, resume=args.resume)
        return
    train(pretrain_config(recipe, overrides))


def cmd_check(args) -> None:
    from tunelab.config import resolve_config
    from tunelab.tasks import get_task

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    config = resolve_config(recipe, overrides)
    task = get_task(config)
    data = task.load_data()
    print(task.format_preflight(data))
    built = task.build_model(data.labels)
    for split, rows in data.splits.items():
        e = task.encode(built.tokenizer, rows)
        if split == "train" and len(e):
            first = getattr(rows[0], "source", "") if hasattr(rows, "__getitem__") else ""
            print(f"\nfirst training example{f' ({first})' if first else ''}: "
                  + task.show_example(built.tokenizer, e, 0))
        if not len(e):
            continue
        lengths = sorted(e.lengths)
        print(f"{split}: tokens per example median {lengths[len(lengths) // 2]}, "
              f"max {lengths[-1]}, truncated at {config.model.max_length}: {e.truncated}")


def cmd_eval(args) -> None:
    import tunelab
    from tunelab.io import atomic_write_json

    predictor = tunelab.load(args.run_dir, precision=args.precision)
    metrics, tracker, problems = predictor.evaluate_file(args.data, args.format)
    for pr in problems[:10]:
        print(f"skipped {pr.where()}: {pr.reason}", file=sys.stderr)
    if len(problems) > 10:
        print(f"... and {len(problems) - 10} more skipped rows", file=sys.stderr)
    print(tracker.report())
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval" / Path(args.data).stem
    extra = tracker.save_artifacts(out, "eval", Path(args.data).name)
    atomic_write_json(out / "metrics.json", {**metrics, "skipped": len(problems), **extra,
                                             "data": args.data})
    written = [out / "metrics.json"] + sorted(out.glob("*.png"))
    print("\nwritten: " + ", ".join(str(w) for w in written))


def cmd_predict(args) -> None:
    import tunelab
    from tunelab.data.readers import write_rows

    from tunelab import exported

    if exported.is_export(args.run_dir):  # onnx/int8: the engine `tunelab serve` runs it with
        predictor = exported.load(args.run_dir, batch_size=args.batch_size)
    else:
        predictor = tunelab.load(args.run_dir, precision=args.precision,
                                 batch_size=args.batch_size)
    out_rows = predictor.predict_file(args.input, args.format)
    write_rows(args.output, out_rows, args.out_format or "auto")
    print(f"{len(out_rows)} predictions written to {args.output}", file=sys.stderr)


def cmd_generate(args) -> None:
    from tunelab.generate import load_generator

    generator = load_generator(args.model, precision=args.precision)
    results = generator.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                                 system=args.system, seed=args.seed)
    for i, (prompt, result) in enumerate(zip(args.prompt, results), start=1):
        if len(results) > 1:
            print(f"--- {i}: {prompt if len(prompt) <= 60 else prompt[:57] + '...'}")
        print(result.text)
        end = ("stopped at eos" if result.finished
               else f"hit --max-new-tokens {args.max_new_tokens} before eos")
        print(f"[{result.new_tokens} new tokens, {end}]", file=sys.stderr)


def cmd_chat(args) -> None:
    from tunelab.generate import load_generator

    generator = load_generator(args.model, precision=args.precision)
    generator.chat(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, system=args.system, seed=args.seed)


def cmd_compare(args) -> None:
    import datetime as dt

    from tunelab.compare import compare, parse_methods

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    out = args.out or f"runs/compare-{dt.datetime.now():%Y%m%d-%H%M%S}"
    rows = compare(recipe, overrides, parse_methods(args.methods), out)
    print((Path(out) / "comparison.md").read_text())
    failed = [r["method"] for r in rows if r["status"] != "ok"]
    print(f"written to {out}/comparison.{{md,csv,json,png}}"
          + (f"; failed: {', '.join(failed)} (logs beside them)" if failed else ""))


def cmd_search(args) -> None:
    import optuna

    from tunelab.search import SearchSettings, search

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    settings = SearchSettings(space=args.space, trials=args.trials, storage=args.storage,
                              study=args.study, pruner=args.pruner, out=args.out, seed=args.seed,
                              startup_trials=args.startup_trials)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tunelab prints one line per trial
    _, out = search(recipe, overrides, settings)
    print((out / "trials.md").read_text())
    if (out / "best.yaml").exists():
        print(f"best recipe: {out / 'best.yaml'} (train it: tunelab train {out / 'best.yaml'})")
    written = sorted(f.name for f in out.iterdir() if f.is_file() and f.name != "study.db")
    print(f"written to {out}/: {', '.join(written)}, trials/")


def cmd_runs_list(args) -> None:
    from tunelab import experiments

    root = Path(args.dir)
    rows = [experiments.summarize(r) for r in experiments.find_runs(root)]
    if not rows:
        raise TunelabError(f"no runs under {root} (a run folder holds config.yaml and env.json)")
    print(experiments.format_runs(rows, root), end="")


def cmd_runs_show(args) -> None:
    from tunelab import experiments

    print(experiments.describe(experiments.check_run(args.run)), end="")


def cmd_runs_diff(args) -> None:
    from tunelab import experiments

    a, b = experiments.check_run(args.run_a), experiments.check_run(args.run_b)
    print(experiments.format_diff(a, b), end="")


def cmd_runs_compare(args) -> None:
    from tunelab import experiments

    runs = [experiments.check_run(r) for r in args.runs]
    metric, summary = experiments.plot_runs(runs, args.metric, Path(args.out))
    for row in summary:
        best = ("no validation" if row["best"] is None else
                f"best validation {metric} {row['best']:.4f} at step {row['best_step']}")
        loss = "" if row["final_loss"] is None else f", last training loss {row['final_loss']:.4f}"
        print(f"{row['run']}: {best}{loss}")
    print(f"written: {args.out}")


def cmd_export(args) -> None:
    from tunelab.export import export

    for kind in args.to.split(","):
        out = export(args.run_dir, kind.strip(), args.out if "," not in args.to else None)
        print(f"{kind}: {out}")


def cmd_verify(args) -> None:
    from tunelab import runs
    from tunelab.data.classification import read_prediction_inputs
    from tunelab.verify import Server, format_checks, verify

    if not args.exports and args.url is None:
        raise TunelabError("nothing to verify: give EXPORT_DIR folders, --url of a running "
                           "tunelab serve, or both")
    data = args.data
    if data is None:
        import importlib.resources

        data = str(importlib.resources.files("tunelab.demo") / "sst2_test.csv")
    config = runs.read_run(Path(args.run_dir))[0]
    _, examples = read_prediction_inputs(data, config.data if args.data else
                                         type(config.data)(), "auto")
    examples = examples[:args.n]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    server = Server(args.url, args.model, args.api_key) if args.url else None
    checks = verify(args.run_dir, args.exports, [e.text for e in examples], pairs, server)
    print(format_checks(checks, len(examples)))
    if not all(c.passed for c in checks):
        raise TunelabError("some targets differ from the run beyond their tolerance")


def cmd_serve(args) -> None:
    from tunelab.serve.app import ServeSettings, serve

    serve(args.runs, ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, queue_size=args.queue_size, max_texts=args.max_texts,
        max_chars=args.max_chars, precision=args.precision, threads=args.threads,
        max_new_tokens=args.max_new_tokens, generation_queue=args.generation_queue))


def cmd_ui(args) -> None:
    from tunelab.ui.app import UiSettings, ui

    ui(UiSettings(runs=args.runs, recipes=args.recipes, host=args.host, port=args.port))


def load_classifier(run_dir: str, what: str):
    """The Predictor of a finished classification run; other tasks are a clear error."""
    import tunelab
    from tunelab import runs

    config, _, _ = runs.read_run(Path(run_dir))
    if config.task.name != "classification":
        raise TunelabError(f"{what} {run_dir} is a {config.task.name} run; this command needs "
                           "a classification run")
    return tunelab.load(run_dir)


def cmd_monitor(args) -> None:
    from tunelab import monitor
    from tunelab.monitor_report import format_report
    from tunelab.data.readers import read_rows

    watcher = monitor.Monitor(
        load_classifier(args.run, "--run"),
        topic_predictor=load_classifier(args.topic_run, "--topic-run") if args.topic_run
        else None, window=args.window, time_column=args.time_column,
        text_column=args.text_column, topic_column=args.topic_column,
        negative_label=args.negative_label, threshold=args.threshold, change=args.change,
        min_count=args.min_count, skip_bad=args.skip_bad)
    if args.input == "-":
        source, rows, name = "<stdin>", monitor.read_stream(sys.stdin), "stdin"
    else:
        source, rows, name = args.input, read_rows(args.input), Path(args.input).stem
    out = Path(args.out) if args.out else Path(args.run) / "monitor" / name
    monitor.run(watcher, rows, out, source=source, follow=args.follow,
                emit=lambda message: print(message, flush=True))
    if watcher.texts == 0:
        raise TunelabError(f"{source}: no usable rows" + (
            f"; first problem: {watcher.problems[0]}" if watcher.problems else ""))
    print(format_report(watcher, source))
    print(f"written to {out}/: report.md, series.csv, alerts.csv, alerts.jsonl, trend.png")


def cmd_explain(args) -> None:
    from tunelab.explain import explain, format_explanation, write_explanations

    if args.pair and len(args.pair) != len(args.text):
        raise TunelabError(f"{len(args.pair)} --pair for {len(args.text)} --text: give one "
                           "--pair per --text, in the same order")
    predictor = load_classifier(args.run_dir, "RUN_DIR")
    explanations = explain(predictor, args.text, args.pair, label=args.label,
                           method=args.method, steps=args.steps)
    for i, e in enumerate(explanations, start=1):
        print(f"[{i}] {format_explanation(e)}")
    out = Path(args.out) if args.out else Path(args.run_dir) / "explain"
    write_explanations(explanations, out, str(args.run_dir),
                       args.steps if args.method == "ig" else None)
    print(f"\nwritten to {out}/: explanations.html, explanations.json and a PNG heat-map "
          f"per text (explanation_001.png ...)")


def cmd_zeroshot(args) -> None:
    import datetime as dt

    from tunelab.config import DataConfig
    from tunelab.data.classification import problem_lines
    from tunelab.data.readers import write_rows
    from tunelab.io import atomic_write_json
    from tunelab.zeroshot import (ZeroShotClassifier, ZeroShotSettings, classify_file,
                                  default_scorer, labels_from_names, load_label_file)

    if bool(args.labels) == bool(args.label_file):
        raise TunelabError("give the labels with --labels a,b or --label-file FILE (one of them)")
    spec = load_label_file(args.label_file) if args.label_file else labels_from_names(args.labels)
    given = {"templates": args.template, "aggregate": args.aggregate,
             "temperature": args.temperature,
             "prompt": args.prompt.replace("\\n", "\n") if args.prompt else None,
             "verbalizer_prefix": args.verbalizer_prefix, "entailment_label": args.entailment_label,
             "batch_size": args.batch_size, "max_length": args.max_length}
    settings = ZeroShotSettings(scorer=args.scorer or default_scorer(args.model),
                                length_norm=not args.no_length_norm,
                                calibrate=not args.no_calibration,
                                **{k: v for k, v in given.items() if v is not None})
    classifier = ZeroShotClassifier.load(args.model, spec, settings)
    data_cfg = DataConfig(text_column=args.text_column, label_column=args.label_column,
                          format=args.format)
    rows, metrics, tracker, problems = classify_file(classifier, args.data, data_cfg, args.format)
    out = Path(args.out or f"runs/zeroshot-{dt.datetime.now():%Y%m%d-%H%M%S}")
    output = Path(args.output) if args.output else out / "predictions.csv"
    write_rows(output, rows)
    atomic_write_json(out / "zeroshot.json", {**classifier.describe(), "data": args.data,
                                              "predictions": str(output)})
    written = [output, out / "zeroshot.json"]
    if metrics is not None:
        if problems:
            print("\n".join(problem_lines(problems, "rows (unknown or missing label)")),
                  file=sys.stderr)
        print(tracker.report())
        extra = tracker.save_artifacts(out, "zeroshot", f"zero-shot {settings.scorer}")
        atomic_write_json(out / "metrics.json", {**metrics, "skipped": len(problems), **extra,
                                                 "data": args.data})
        written += [out / "metrics.json", out / "confusion_zeroshot.png"]
    print(f"{len(rows)} predictions ({settings.scorer} scorer); written: "
          + ", ".join(str(w) for w in written))


def cmd_fewshot_eval(args) -> None:
    import datetime as dt

    from tunelab import fewshot_eval as fe
    from tunelab.zeroshot import load_label_file

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    plan = fe.make_plan(recipe, overrides, fe.parse_methods(args.methods),
                        fe.parse_ints(args.k, "--k"), fe.parse_ints(args.seeds, "--seeds"),
                        load_label_file(args.label_file) if args.label_file else None)
    out = Path(args.out or f"runs/fewshot-{dt.datetime.now():%Y%m%d-%H%M%S}")
    fe.fewshot_eval(plan, out, fresh=args.fresh)
    print((out / "results.md").read_text())
    print(f"written to {out}/: results.json, results.md, results.png"
          + (", runs/ (the fine-tuning runs)" if "finetune" in plan.methods else ""))


def cmd_self_train(args) -> None:
    from tunelab.selftrain import plan_self_train, self_train_recipe

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    config, settings = plan_self_train(recipe, overrides, {
        "unlabelled": args.unlabelled, "rounds": args.rounds, "threshold": args.threshold,
        "per_class": args.per_class, "sample_unlabelled": args.sample_unlabelled,
        "seed": args.seed})
    self_train_recipe(config, settings, args.out, recipe)
    print(Path(args.out, "rounds.md").read_text())
    print(f"written to {args.out}/: rounds.json, rounds.md, round-<r>/ (one run per round; the "
          f"last is the model to use), data/ (training files and pseudo-labelled rows)")


def cmd_select(args) -> None:
    from tunelab.active import describe, select_file
    from tunelab.data.readers import write_rows

    predictor = load_classifier(args.run_dir, "RUN_DIR")
    selection = select_file(predictor, args.data, args.n, args.strategy, args.seed)
    write_rows(args.out, selection.rows)
    print(describe(selection, args.strategy, args.out))


def cmd_methods(args) -> None:
    from tunelab.methods.registry import all_methods

    try:
        from tunelab.methods.table import format_methods_table

        print(format_methods_table())
    except ImportError:
        for spec in all_methods():
            print(f"{spec.name:<18} lr {spec.default_lr:<8g} mergeable {spec.mergeable!s:<6} "
                  f"{spec.summary}")


def cmd_config(args) -> None:
    from tunelab.config import describe_fields

    for key, default, doc in describe_fields():
        print(f"{key} = {default}\n    {doc}")


def split_recipe(recipe: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`tunelab train a=b` has no recipe: the first word is then an override."""
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *overrides]
    return recipe, list(overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=(
        "Adapt pretrained transformers to your task, then evaluate, compare and predict."))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("train", help="train a model from a recipe (default: MiniLM on the demo set)")
    p.add_argument("recipe", nargs="?", help="recipe YAML (optional)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.set_defaults(fn=cmd_train)

    p = verbs.add_parser("pretrain", help="masked or causal LM on unlabelled text, from scratch "
                                          "(model.size) or continued from model.name")
    p.add_argument("recipe", nargs="?", help="recipe YAML (optional; task defaults to mlm)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.train=corpus.txt")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    p.set_defaults(fn=cmd_pretrain)

    p = verbs.add_parser("check", help="preflight a recipe's data and show a tokenised example")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_check)

    p = verbs.add_parser("eval", help="evaluate a run on a labelled file")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="labelled file (same columns as training)")
    p.add_argument("--format", default="auto")
    p.add_argument("--out", help="folder for metrics.json (and plots such as confusion_eval.png)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.set_defaults(fn=cmd_eval)

    p = verbs.add_parser("predict", help="label every row of a file")
    p.add_argument("run_dir", metavar="RUN_DIR|EXPORT_DIR",
                   help="a run, or its onnx/int8 export (ONNX Runtime; --precision unused)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="auto", help="input format")
    p.add_argument("--out-format", help="output format (default: from the output extension)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.set_defaults(fn=cmd_predict)

    for verb, help_text in (("generate", "generate replies to prompts (instruction run or model)"),
                            ("chat", "chat on the terminal with an instruction run or a model")):
        p = verbs.add_parser(verb, help=help_text)
        p.add_argument("model", metavar="RUN_DIR|MODEL",
                       help="an instruction run, or a causal LM (alias such as smollm2, folder)")
        if verb == "generate":
            p.add_argument("--prompt", action="append", required=True,
                           help="a user message (repeat for several, generated as a batch)")
        p.add_argument("--system", help="system message (default: the run's system prompt)")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share")
        p.add_argument("--seed", type=int, default=0, help="seed for sampling")
        p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
        p.set_defaults(fn=cmd_generate if verb == "generate" else cmd_chat)

    p = verbs.add_parser("compare", help="train a recipe with several methods and tabulate them")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--methods", help="comma-separated (default: every method the model supports)")
    p.add_argument("--out", help="output folder (default: runs/compare-<date>-<time>)")
    p.set_defaults(fn=cmd_compare)

    p = verbs.add_parser("search", help="hyper-parameter search over recipe keys (Optuna)")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--space", required=True, help="YAML: config key -> distribution "
                   "(docs/experiments.md)")
    p.add_argument("--trials", type=int, default=20, help="trials this process runs")
    p.add_argument("--storage", help="Optuna storage shared by every process of the study: "
                   "sqlite:///study.db or an RDB URL (default: sqlite:///OUT/study.db)")
    p.add_argument("--study", help="study name; an existing one is continued "
                   "(default: the recipe's file name)")
    p.add_argument("--pruner", default="median", choices=["median", "asha", "none"])
    p.add_argument("--startup-trials", type=int, default=5,
                   help="trials sampled at random and never pruned before TPE and the median "
                        "rule take over")
    p.add_argument("--seed", type=int, help="sampler seed (default: random)")
    p.add_argument("--out", help="output folder (default: runs/search-<study>)")
    p.set_defaults(fn=cmd_search)

    p = verbs.add_parser("runs", help="list, show, diff and plot run directories")
    runs_verbs = p.add_subparsers(dest="runs_verb", required=True, metavar="ACTION")
    q = runs_verbs.add_parser("list", help="a table of the runs under a folder")
    q.add_argument("dir", nargs="?", default="runs")
    q.set_defaults(fn=cmd_runs_list)
    q = runs_verbs.add_parser("show", help="one run: config, status, results, files")
    q.add_argument("run")
    q.set_defaults(fn=cmd_runs_show)
    q = runs_verbs.add_parser("diff", help="config keys that differ between two runs")
    q.add_argument("run_a")
    q.add_argument("run_b")
    q.set_defaults(fn=cmd_runs_diff)
    q = runs_verbs.add_parser("compare", help="training loss and validation metric curves")
    q.add_argument("runs", nargs="+")
    q.add_argument("--metric", help="validation metric to plot (default: the task's metric)")
    q.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    q.set_defaults(fn=cmd_runs_compare)

    p = verbs.add_parser("export", help="export a run: merged, adapter, onnx, int8")
    p.add_argument("run_dir")
    p.add_argument("--to", required=True, help="merged, adapter, onnx or int8 (comma-separated)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/export/KIND)")
    p.set_defaults(fn=cmd_export)

    p = verbs.add_parser("verify", help="check exports and a live server give the run's "
                         "outputs on probe inputs")
    p.add_argument("run_dir")
    p.add_argument("exports", nargs="*", metavar="EXPORT_DIR")
    p.add_argument("--url", help="a running tunelab serve (http://HOST:PORT): check what its "
                   "/v1/classify answers")
    p.add_argument("--model", help="served name to check (default: RUN_DIR's folder name)")
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="the server's key (default: $TUNELAB_API_KEY)")
    p.add_argument("--data", help="probe file (default: the packaged demo test texts)")
    p.add_argument("-n", type=int, default=256, help="number of probe inputs")
    p.set_defaults(fn=cmd_verify)

    p = verbs.add_parser("serve", help="serve runs over HTTP: classify, tag, generate, "
                         "OpenAI-style chat (adapters on one base share it)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folder, onnx/int8 export folder (served under its run's name), "
                        "or NAME=FOLDER")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' "
                        "(default: $TUNELAB_API_KEY; unset = no key)")
    p.add_argument("--max-batch", type=int, default=64, help="texts per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="under load, how long queued requests wait for more to batch with "
                        "(a request that finds the server idle never waits)")
    p.add_argument("--queue-size", type=int, default=256,
                   help="requests that may wait; beyond it: 503")
    p.add_argument("--max-texts", type=int, default=256, help="texts per request")
    p.add_argument("--max-chars", type=int, default=10000, help="characters per text")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch and ONNX Runtime threads for inference (default 0: every "
                        "usable core)")
    p.add_argument("--max-new-tokens", type=int, default=1024,
                   help="most new tokens one generation may ask for (default per request: 256)")
    p.add_argument("--generation-queue", type=int, default=8,
                   help="generation requests held at once, the running one included; "
                        "beyond it: 503")
    p.set_defaults(fn=cmd_serve)

    p = verbs.add_parser("ui", help="local dashboard in the browser: runs table, curves, "
                         "comparisons, start and follow trainings (docs/experiments.md)")
    p.add_argument("--runs", default="runs", help="folder of runs to show, where new "
                   "trainings go (default: runs)")
    p.add_argument("--recipes", help="folder of recipes for the training form "
                   "(default: configs/ when it exists)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(fn=cmd_ui)

    p = verbs.add_parser("monitor", help="classify timestamped texts, track the negative "
                         "share per topic and window, alert on spikes")
    p.add_argument("--run", required=True, help="classification run (sentiment, or any labels)")
    p.add_argument("--topic-run", help="a second run whose label is each text's topic")
    p.add_argument("--input", required=True,
                   help="csv/tsv/json/jsonl/parquet file, or - for a stream of JSON lines or "
                        "CSV (header first) on stdin")
    p.add_argument("--time-column", default="time",
                   help="ISO 8601 times (no zone = UTC) or epoch seconds")
    p.add_argument("--text-column", default="text")
    p.add_argument("--topic-column", help="column holding each text's topic")
    p.add_argument("--window", default="1h", help="window length: 15min, 1h, 1d ... (UTC)")
    p.add_argument("--negative-label", default="negative", help="the label whose share is watched")
    p.add_argument("--threshold", type=float, default=0.4,
                   help="alert when a window's share reaches this")
    p.add_argument("--change", type=float, default=0.2,
                   help="alert when the share moves this much from the previous window")
    p.add_argument("--min-count", type=int, default=20,
                   help="windows with fewer texts raise no alert")
    p.add_argument("--out", help="report folder (default: RUN/monitor/<input name>)")
    p.add_argument("--follow", action="store_true",
                   help="print alerts as they are raised, keep the report current")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip rows with a bad time, text or topic (counted) instead of stopping")
    p.set_defaults(fn=cmd_monitor)

    p = verbs.add_parser("explain", help="which words drove a prediction (token attributions)")
    p.add_argument("run_dir")
    p.add_argument("--text", action="append", required=True, help="a text (repeatable)")
    p.add_argument("--pair", action="append", help="its second text, for pair tasks (repeatable)")
    p.add_argument("--label", help="explain this label (default: the predicted one)")
    p.add_argument("--method", default="ig", choices=["ig", "gxi"],
                   help="ig: integrated gradients (default); gxi: gradient x input (fast)")
    p.add_argument("--steps", type=int, default=50, help="integration steps for ig")
    p.add_argument("--out", help="output folder (default: RUN_DIR/explain)")
    p.set_defaults(fn=cmd_explain)

    p = verbs.add_parser("zeroshot", help="classify with no training: sentence similarity, "
                         "causal-LM scoring or an NLI run (docs/fewshot.md)")
    p.add_argument("--model", required=True, help="minilm, mpnet (similarity); smollm2, "
                   "gemma3-270m (lm); an NLI classification run (nli); or a model folder")
    p.add_argument("--scorer", choices=["similarity", "lm", "nli"],
                   help="default: nli for a run directory, lm for a causal LM, else similarity")
    p.add_argument("--data", required=True, help="texts to classify; with a label column, "
                   "metrics are computed too")
    p.add_argument("--format", default="auto")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--labels", help="comma-separated label names in id order (0, 1, ...)")
    p.add_argument("--label-file", help="YAML/JSON: label -> description(s), or -> "
                   "{descriptions: [...], verbalizers: [...]}")
    p.add_argument("--template", action="append", help="similarity/nli: template with {} for "
                   "the description, e.g. 'This review is {}.' (repeatable)")
    p.add_argument("--aggregate", choices=["max", "mean"],
                   help="combine a label's descriptions/verbalisers (default max)")
    p.add_argument("--temperature", type=float, help="similarity: softmax temperature (0.05)")
    p.add_argument("--prompt", help="lm: prompt with {text}, e.g. 'Review: {text}\\nSentiment:'")
    p.add_argument("--verbalizer-prefix", help="lm: text between prompt and label word "
                   "(default a space; '' for Chinese)")
    p.add_argument("--no-calibration", action="store_true",
                   help="lm: skip contextual calibration")
    p.add_argument("--no-length-norm", action="store_true",
                   help="lm: sum label-token log-probabilities instead of averaging them")
    p.add_argument("--entailment-label", help="nli: the run's entailment label "
                   "(default: the one named entailment)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--output", help="predictions file (default: OUT/predictions.csv)")
    p.add_argument("--out", help="folder for zeroshot.json, metrics.json and the confusion "
                   "plot (default: runs/zeroshot-<date>-<time>)")
    p.set_defaults(fn=cmd_zeroshot)

    p = verbs.add_parser("fewshot-eval", help="k examples per class over several seeds: "
                         "SetFit, fine-tuning, zero-shot; mean ± std table")
    p.add_argument("recipe", nargs="?", help="recipe: data.train is the pool, data.test the test")
    p.add_argument("overrides", nargs="*", help="key=value, including setfit.* and finetune.*")
    p.add_argument("--methods", default="setfit,finetune,zeroshot",
                   help="comma-separated: setfit, finetune, zeroshot, prompt (PET/LM-BFF), "
                        "selftrain (SetFit + self-training on selftrain.unlabelled)")
    p.add_argument("--k", default="8,16,32", help="examples per class (comma-separated)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="sampling/training seeds")
    p.add_argument("--label-file", help="zeroshot: label descriptions (as for tunelab zeroshot)")
    p.add_argument("--out", help="output folder (default: runs/fewshot-<date>-<time>); runs "
                   "an earlier fewshot-eval left there are kept and not run again")
    p.add_argument("--fresh", action="store_true",
                   help="replace the runs an earlier fewshot-eval left in --out")
    p.set_defaults(fn=cmd_fewshot_eval)

    p = verbs.add_parser("self-train", help="train, pseudo-label unlabelled text, retrain: "
                         "one run per round (docs/selftrain.md)")
    p.add_argument("recipe", nargs="?", help="recipe with the labelled data (data.train)")
    p.add_argument("overrides", nargs="*", help="key=value, including selftrain.*")
    p.add_argument("--unlabelled", help="texts to pseudo-label (the recipe's text column; a "
                   "label column there is only used to report pseudo-label accuracy)")
    p.add_argument("--rounds", type=int, help="self-training rounds after the first run (3)")
    p.add_argument("--threshold", type=float,
                   help="least confidence for a pseudo-label (0.7)")
    p.add_argument("--per-class", type=int, help="most rows added per class per round (32)")
    p.add_argument("--sample-unlabelled", type=int,
                   help="unlabelled rows scored per round, a seeded sample (5000)")
    p.add_argument("--seed", type=int, help="seed of those samples (0)")
    p.add_argument("--out", required=True, help="folder for the rounds' runs and rounds.json")
    p.set_defaults(fn=cmd_self_train)

    p = verbs.add_parser("select", help="active learning: the unlabelled rows most worth "
                         "labelling next, with the model's guess")
    p.add_argument("run_dir")
    p.add_argument("--data", required=True, help="unlabelled rows (the run's text column)")
    p.add_argument("--n", type=int, required=True, help="rows to select")
    p.add_argument("--strategy", default="hybrid", choices=["uncertainty", "margin", "entropy",
                                                            "diversity", "hybrid"],
                   help="uncertainty (least confidence), margin, entropy, diversity (k-means "
                        "on embeddings) or hybrid (diversity among the 10 x N least "
                        "confident; default)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (diversity, hybrid)")
    p.add_argument("--out", required=True, help="CSV or JSONL to write (by its suffix)")
    p.set_defaults(fn=cmd_select)

    p = verbs.add_parser("methods", help="list adaptation methods and what they support")
    p.set_defaults(fn=cmd_methods)
    p = verbs.add_parser("config", help="list every config key with its default and doc")
    p.set_defaults(fn=cmd_config)
    return parser


def quiet_libraries() -> None:
    """tunelab reports what matters itself (new head, parameters that train); the libraries'
    load reports and per-load progress bars would bury it."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def parse_args(argv: list[str] | None = None):
    """argparse, except that key=value overrides may also come after the options
    (`tunelab train recipe.yaml --resume run train.lr=1e-4`): argparse alone stops collecting
    a positional list at the first option and rejects what follows."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and (stray or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        args.fn(args)
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
