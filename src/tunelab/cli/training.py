"""Handlers of the verbs that train: `tunelab train`, `pretrain`, `check` (a recipe's
preflight), `compare` (one recipe, several methods) and `search` (Optuna over recipe keys)."""
from __future__ import annotations

from pathlib import Path

from tunelab.cli.common import split_recipe
from tunelab.errors import TunelabError


def cmd_train(args) -> None:
    from tunelab.config import resolve_config

    _train_or_resume(args, resolve_config)


def cmd_pretrain(args) -> None:
    from tunelab.pretrain import pretrain_config

    _train_or_resume(args, pretrain_config)


def _train_or_resume(args, make_config) -> None:
    """A new run from make_config(recipe, overrides), or --resume RUN_DIR with its saved
    config.yaml (and nothing else)."""
    from tunelab.train.loop import train

    recipe, overrides = split_recipe(args.recipe, args.overrides)
    if args.resume:
        if recipe or overrides:
            raise TunelabError("--resume continues a run with its saved config.yaml; "
                               "give no recipe or overrides with it")
        train(None, resume=args.resume)
    else:
        train(make_config(recipe, overrides))


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
