"""`tunelab search`: hyper-parameter search over any recipe key, on Optuna.

Optuna samples (TPE), prunes (median rule or ASHA, from the validation metric reported at
every evaluation) and stores the study; tunelab supplies the trials. A trial is one `train`
call in this process, with its own run directory OUT/trials/trial-<n>. Several processes or
machines work on one study by pointing at one storage (`--storage sqlite:///study.db` or an
RDB URL, same `--study`): Optuna hands each a different trial. There is no scheduler of our own.

The space file maps config keys to distributions (docs/experiments.md):

    train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}
    train.warmup_ratio: {type: float, low: 0.0, high: 0.2, step: 0.05}
    train.batch_size: {type: int, low: 8, high: 64, log: true}
    method.r: {type: categorical, choices: [4, 8, 16]}
    method.name: [lora, ia3]          # a plain list is short for categorical

`method.name` is drawn first; a `method.*` key is drawn only for methods that have that
setting, and the recipe's method settings are dropped when another method is drawn (they
belong to the recipe's method).
"""
from __future__ import annotations

import copy
import csv
import gc
import io
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import load_recipe, merge_override, parse_override, resolve_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from tunelab.search_space import Param, load_space

PRUNERS = ("median", "asha", "none")


@dataclass
class SearchSettings:
    space: str
    """The space YAML file."""
    trials: int = 20
    """Trials this process runs (each process sharing a study runs its own N)."""
    storage: str | None = None
    """Optuna storage URL. Unset: sqlite:///OUT/study.db."""
    study: str | None = None
    """Study name; an existing study of that name in the storage is continued."""
    pruner: str = "median"
    """median, asha (asynchronous successive halving) or none."""
    out: str | None = None
    """Output folder. Unset: runs/search-<study>."""
    seed: int | None = None
    """Seed of the sampler (same seed, same storage state -> same proposals); unset = random."""
    startup_trials: int = 5
    """Trials sampled at random and never pruned before TPE and the median rule take over."""

    def __post_init__(self):
        if self.trials < 1:
            raise ConfigError("--trials must be at least 1")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}; got {self.pruner!r}")
        if self.startup_trials < 0:
            raise ConfigError("--startup-trials must be 0 or more")


# --------------------------------------------------------------------------------------------
# trials


def base_tree(recipe: str | None, overrides: list[str]) -> dict:
    """The recipe with the command-line overrides applied, as plain data."""
    tree = json.loads(json.dumps(load_recipe(recipe)))
    for text in overrides:
        path, value = parse_override(text)
        merge_override(tree, path, value)
    return tree


def trial_tree(base: dict, values: dict[str, Any], run_dir: Path | None = None) -> dict:
    """`base` with the drawn values; a different method drops the recipe's method settings."""
    tree = copy.deepcopy(base)
    if "method.name" in values and values["method.name"] != base_method(tree):
        tree["method"] = {}
    for key, value in values.items():
        merge_override(tree, key.split("."), value)
    if run_dir is not None:
        tree["run_dir"] = str(run_dir)
    return tree


def base_method(tree: dict) -> str:
    return (tree.get("method") or {}).get("name", "full")


def method_has(method: str, key: str) -> bool:
    """Whether `method.<setting>` applies to `method`."""
    import dataclasses

    from tunelab.methods import registry

    setting = key.split(".", 1)[1]
    return setting in {f.name for f in dataclasses.fields(registry.get_method(method).settings)}


def draw(trial, space: list[Param], base: dict) -> dict[str, Any]:
    """One trial's values; method settings only where the drawn method has them."""
    values = {}
    for p in space:
        if p.key.startswith("method.") and p.key != "method.name":
            method = values.get("method.name", base_method(base))
            if not method_has(method, p.key):
                continue
        values[p.key] = p.suggest(trial)
    return values


def check_space(base: dict, space: list[Param]) -> None:
    """Every key must exist in the config and accept its values, before the first trial.
    `method.name` is first in `space`, so its choices are known methods by the time a method
    setting is checked."""
    names = next((p.choices for p in space if p.key == "method.name"), [base_method(base)])
    for p in space:
        tries = [p.example()] if p.type != "categorical" else p.choices
        for value in tries:
            values = {p.key: value}
            if p.key.startswith("method.") and p.key != "method.name":
                having = [m for m in names if method_has(m, p.key)]
                if not having:
                    raise ConfigError(f"{p.where}: {p.key}: no method searched "
                                      f"({', '.join(names)}) has the setting "
                                      f"{p.key.split('.', 1)[1]!r}")
                values["method.name"] = having[0]
            try:
                resolve_config(tree=trial_tree(base, values))
            except ConfigError as e:
                raise ConfigError(f"{p.where}: {p.key}={value!r}: {e}") from None


def make_sampler(seed: int | None, startup_trials: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)


def make_pruner(name: str, startup_trials: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()  # rungs from the first trial's steps
    return optuna.pruners.NopPruner()


class Objective:
    """One trial: draw, train in this process with a pruning hook, return the validation
    metric of the best checkpoint."""

    def __init__(self, base: dict, space: list[Param], metric: str, out: Path):
        self.base, self.space, self.metric, self.out = base, space, metric, out

    def __call__(self, trial) -> float:
        import optuna

        from tunelab import experiments
        from tunelab.train.loop import train

        values = draw(trial, self.space, self.base)
        run_dir = self.out / "trials" / f"trial-{trial.number:03d}"
        config = resolve_config(tree=trial_tree(self.base, values, run_dir))
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("config", config.to_dict())
        say(f"[trial {trial.number}] {format_values(values)}")

        def report(step: int, metrics: dict) -> None:
            trial.report(metrics[self.metric], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: validation {self.metric} "
                                         f"{metrics[self.metric]:.4f}")

        start = time.perf_counter()
        try:
            train(config, quiet=True, on_evaluate=report)
        except optuna.TrialPruned as e:
            experiments.set_status(run_dir, "pruned", error=str(e))
            say(f"[trial {trial.number}] {e} ({time.perf_counter() - start:.1f} s)")
            raise
        finally:
            release_memory()
        results = experiments.read_optional_json(run_dir / "results.json")
        value = results["validation"][self.metric]
        say(f"[trial {trial.number}] validation {self.metric} {value:.4f} "
            f"({time.perf_counter() - start:.1f} s)")
        return value


def release_memory() -> None:
    """Trials run one after another in one process: free the last one's model first."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# the study


def search(recipe: str | None, overrides: list[str], settings: SearchSettings):
    """Run `settings.trials` trials of the study, then write the output folder. Returns the
    optuna Study and the output folder."""
    import torch

    from tunelab.tasks import get_task

    base = base_tree(recipe, overrides)
    config = resolve_config(tree=base)
    if not (config.data.validation or config.data.validation_ratio > 0):
        raise ConfigError("a search compares trials on the validation split: set "
                          "data.validation or data.validation_ratio > 0")
    task = get_task(config)
    metric, lower = task.metric, task.metric in task.lower_is_better
    space = load_space(settings.space)
    check_space(base, space)
    name = settings.study or (Path(recipe).stem if recipe else "search")
    out = Path(settings.out or f"runs/search-{name}")
    out.mkdir(parents=True, exist_ok=True)
    storage = settings.storage or f"sqlite:///{out / 'study.db'}"
    study = open_study(storage, name, "minimize" if lower else "maximize", metric, settings)
    say(f"study {name!r} in {storage}: {len(study.trials)} trials so far; running "
        f"{settings.trials} more, {'minimizing' if lower else 'maximizing'} validation {metric}"
        f", pruner {settings.pruner}")
    keys = [p.key for p in space]
    try:
        study.optimize(Objective(base, space, metric, out), n_trials=settings.trials,
                       catch=(torch.OutOfMemoryError,),
                       callbacks=[lambda s, _: write_tables(s, out, metric, keys)])
    finally:  # also after Ctrl-C or an error: the tables show where the study stands
        write_outputs(study, out, metric, keys, storage)
    return study, out


def open_study(storage: str, name: str, direction: str, metric: str, settings: SearchSettings):
    """Create the study, or join it: refuses one that optimises something else."""
    import optuna

    study = optuna.create_study(
        storage=connect_storage(storage), study_name=name, direction=direction,
        load_if_exists=True, sampler=make_sampler(settings.seed, settings.startup_trials),
        pruner=make_pruner(settings.pruner, settings.startup_trials))
    if len(study.directions) != 1 or study.direction.name.lower() != direction:
        raise TunelabError(f"study {name!r} in {storage} was created to "
                           f"{study.direction.name.lower()} (not {direction}): pick another "
                           f"--study")
    recorded = study.user_attrs.get("metric")
    if recorded is None:
        study.set_user_attr("metric", metric)
    elif recorded != metric:
        raise TunelabError(f"study {name!r} in {storage} optimises validation {recorded}, this "
                           f"recipe {metric}: pick another --study or set train.metric={recorded}")
    return study


def connect_storage(url: str):
    """Optuna's RDB storage at `url`. Optuna creates its tables on first use, and workers
    started together on a new database race there ("table already exists", a UNIQUE
    constraint); the loser retries and finds the tables made. The heartbeat lets Optuna mark a
    trial failed when its worker was killed, instead of leaving it running forever."""
    import optuna
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as e:
        raise TunelabError(f"--storage {url!r} is not a database URL ({e}); e.g. "
                           f"sqlite:///study.db or postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as e:
            if attempt == 3:
                raise TunelabError(f"cannot open the study storage {url!r}: {e.orig}") from None
            time.sleep(0.5 * (attempt + 1))
        except (ImportError, sqlalchemy.exc.ArgumentError) as e:
            raise TunelabError(f"cannot open the study storage {url!r}: {e} (is its database "
                               f"driver installed?)") from None


# --------------------------------------------------------------------------------------------
# outputs


TABLE_HEAD = ("trial", "state", "value", "step", "seconds", "run_dir")


def trial_rows(study, keys: list[str]) -> list[dict]:
    rows = []
    for t in study.trials:
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else None)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "step": t.last_step, **{k: t.params.get(k) for k in keys},
                     "seconds": round(seconds, 1) if seconds is not None else None,
                     "run_dir": t.user_attrs.get("run_dir")})
    return rows


def best_trial(study):
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if done else None


def write_tables(study, out: Path, metric: str, keys: list[str]) -> None:
    """trials.csv, trials.md and best.yaml; after every trial, so a long search can be read
    (and its best recipe used) while it runs."""
    rows = trial_rows(study, keys)
    columns = list(TABLE_HEAD[:4]) + keys + list(TABLE_HEAD[4:])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "trials.csv", buf.getvalue())
    best = best_trial(study)
    head = ["trial", "state", f"validation {metric}", "last step"] + keys + ["seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mark = " (best)" if best is not None and r["trial"] == best.number else ""
        cells = [f"{r['trial']}{mark}", r["state"], _fmt(r["value"]), _fmt(r["step"])]
        cells += [_fmt(r[k]) for k in keys] + [_fmt(r["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "trials.md", "\n".join(lines) + "\n")
    if best is not None:
        write_best_recipe(best, out / "best.yaml", study.study_name, metric)


def write_best_recipe(best, path: Path, study_name: str, metric: str) -> None:
    config = dict(best.user_attrs["config"])
    config.pop("run_dir", None)
    header = (f"# best trial {best.number} of study {study_name}: validation {metric} "
              f"{best.value:.4f}\n# {format_values(best.params)}\n"
              f"# trained in {best.user_attrs.get('run_dir')}\n")
    atomic_write_text(path, header + yaml.safe_dump(config, sort_keys=False))


def write_outputs(study, out: Path, metric: str, keys: list[str], storage: str) -> None:
    """The tables, summary.json and the plots (history, intermediate values, importances)."""
    import optuna

    write_tables(study, out, metric, keys)
    best = best_trial(study)
    states = [t.state.name.lower() for t in study.trials]
    atomic_write_json(out / "summary.json", {
        "study": study.study_name, "storage": storage, "metric": metric,
        "direction": study.direction.name.lower(),
        "trials": {s: states.count(s) for s in sorted(set(states))},
        "best": None if best is None else {"trial": best.number, "value": best.value,
                                           "params": best.params,
                                           "run_dir": best.user_attrs.get("run_dir")}})
    vm = optuna.visualization.matplotlib
    save_plot(vm.plot_optimization_history, study, out / "history.png",
              target_name=f"validation {metric}")
    if any(t.intermediate_values for t in study.trials):
        save_plot(vm.plot_intermediate_values, study, out / "intermediate.png")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varied = [k for k in keys if len({json.dumps(t.params.get(k)) for t in complete}) > 1
              and all(k in t.params for t in complete)]
    if len(complete) >= 2 and varied:
        save_plot(vm.plot_param_importances, study, out / "importance.png", params=varied,
                  target_name=f"validation {metric}")
    else:
        say("importance.png skipped: it needs two finished trials and a parameter that varied "
            "among them")


def save_plot(plot, study, path: Path, **kwargs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot(study, **kwargs)
    fig = ax.figure
    fig.set_size_inches(8, 4.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def format_values(values: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in values.items())


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
