"""Handlers of the verbs for little or no labelled data: `tunelab zeroshot`, `fewshot-eval`
(k examples per class over seeds), `self-train` (a run per pseudo-labelling round) and `select`
(active learning: the rows to label next)."""
from __future__ import annotations

import sys
from pathlib import Path

from tunelab.cli.common import load_classifier, split_recipe
from tunelab.errors import TunelabError


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
    from tunelab.selftrain_runs import plan_self_train, self_train_recipe

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
