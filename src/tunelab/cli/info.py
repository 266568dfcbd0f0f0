"""Handlers of the verbs that show what is there: `tunelab runs list|show|diff|compare` (run
directories), `ui` (the local dashboard), `methods` (the method support matrix) and `config`
(every config key with its doc)."""
from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError


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


def cmd_ui(args) -> None:
    from tunelab.ui.app import UiSettings, ui

    ui(UiSettings(runs=args.runs, recipes=args.recipes, host=args.host, port=args.port))


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
