"""`tunelab self-train`: a `tunelab train` run per round. `RunLearner` makes a training run the
learner of tunelab.selftrain's loop; `plan_self_train` splits a recipe's `selftrain:` settings
from its training config; `self_train_recipe` runs the rounds into OUT/round-<r>/ and writes
OUT/data/ (fixed validation and test rows, each round's training file and pseudo-labelled rows)
and OUT/rounds.json and rounds.md (`write_rounds`)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from tunelab.errors import ConfigError
from tunelab.selftrain import (POOL, RoundReport, SelfTrainSettings, check_not_test,
                               format_round, gold_ids, load_unlabelled, self_train,
                               selftrain_settings)


class RunLearner:
    """A `tunelab train` run as a learner: fit writes the round's training file and trains a
    run directory from the base model; predict_proba reads the run back with
    tunelab.predict.Predictor, exactly as `tunelab predict` would."""

    def __init__(self, tree: dict, labels: list[str], run_dir: Path, data_dir: Path,
                 quiet: bool = False):
        self.tree, self.labels, self.run_dir, self.data_dir = tree, labels, run_dir, data_dir
        self.quiet = quiet
        self._predictor = None

    def fit(self, texts: list[str], labels: list[int]) -> "RunLearner":
        from tunelab.config import resolve_config
        from tunelab.data.readers import write_rows
        from tunelab.train.loop import train

        data = self.tree["data"]
        train_file = self.data_dir / f"{self.run_dir.name}-train.jsonl"
        write_rows(train_file, [{data["text_column"]: t, data["label_column"]: self.labels[y]}
                                for t, y in zip(texts, labels)], "jsonl")
        tree = {**self.tree, "data": {**data, "train": str(train_file)},
                "run_dir": str(self.run_dir)}
        train(resolve_config(tree=tree), quiet=self.quiet)
        self._predictor = None
        return self

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        from tunelab.predict import Predictor

        if self._predictor is None:
            self._predictor = Predictor.from_run(self.run_dir)
        return self._predictor.logits(texts).softmax(-1).numpy()

    def test_metrics(self) -> dict | None:
        """The run's own test-split figures (results.json), when the recipe has a test set."""
        import json

        return json.loads((self.run_dir / "results.json").read_text()).get("test")


def plan_self_train(recipe: str | None, overrides: list[str],
                    given: dict) -> tuple[object, SelfTrainSettings]:
    """(RunConfig, SelfTrainSettings): the recipe's `selftrain:` section and selftrain.*
    overrides are split from the training config; `given` (the command's flags, None where
    not given) overrides both."""
    from tunelab.config import load_recipe, merge_override, parse_override, resolve_config

    tree = load_recipe(recipe)
    sections = {"selftrain": tree.pop("selftrain", None) or {}}
    rest = []
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "selftrain":
            merge_override(sections, path, value)
        else:
            rest.append(text)
    sections["selftrain"].update({k: v for k, v in given.items() if v is not None})
    return resolve_config(tree=tree, overrides=rest), selftrain_settings(sections["selftrain"])


def self_train_recipe(config, settings: SelfTrainSettings, out: str | Path,
                      recipe: str | None = None, quiet: bool = False) -> list[RoundReport]:
    """`tunelab self-train`: the recipe's labelled data, settings.unlabelled as the pile to
    pseudo-label; OUT/round-<r>/ per round (normal run directories), OUT/data/ (the fixed
    validation and test rows, each round's training file and pseudo-labelled rows),
    OUT/rounds.json and OUT/rounds.md, rewritten after every round."""
    from tunelab.data.classification import load_classification_data

    out = Path(out)
    if (out / "rounds.json").exists() or (out / "round-0").exists():
        raise ConfigError(f"{out} already holds a self-training run; pick another --out")
    if settings.unlabelled is None:
        raise ConfigError("self-training needs unlabelled text: give --unlabelled FILE (or "
                          "selftrain.unlabelled in the recipe)")
    if config.task.name != "classification":
        raise ConfigError(f"self-train trains classifiers; the recipe's task is "
                          f"{config.task.name}")
    if settings.unlabelled == POOL:
        raise ConfigError("selftrain.unlabelled: pool means fewshot-eval's pool; tunelab "
                          "self-train needs a file of unlabelled text (--unlabelled FILE)")
    check_not_test(settings.unlabelled, config.data)
    data = load_classification_data(config.data)
    labelled = data.splits["train"]
    known = {e.text for split in data.splits.values() for e in split}
    pile = load_unlabelled(settings.unlabelled, config.data, known)
    gold = gold_ids(pile.raw_labels, data.labels, config.data.labels is not None)
    tree = _round_tree(config, data, out / "data")

    def make_learner(r: int) -> RunLearner:
        return RunLearner(tree, data.labels, out / f"round-{r}", out / "data", quiet)

    reports: list[RoundReport] = []

    def on_round(report: RoundReport, learner: RunLearner) -> None:
        report.test = learner.test_metrics()
        reports.append(report)
        _write_pseudo_rows(out / "data" / f"round-{report.round}-pseudo.jsonl", report,
                           pile.texts, gold, data.labels)
        write_rounds(out, reports, data.labels, settings, pile.source, recipe)
        print(f"self-train round {format_round(report, data.labels)}", file=sys.stderr,
              flush=True)

    self_train(make_learner, [e.text for e in labelled], [e.label for e in labelled],
               pile.texts, settings, on_round=on_round, unlabelled_gold=gold)
    return reports


def _round_tree(config, data, data_dir: Path) -> dict:
    """The recipe as a tree whose data section reads fixed files: the validation and test rows
    written once (so every round is scored on the same labelled rows), the training file set
    per round. Column names stay the recipe's, so `tunelab predict` on the final run reads the
    user's files as the recipe did."""
    from tunelab.data.readers import write_rows

    cfg = config.data
    files = {}
    for split in ("validation", "test"):
        if split in data.splits:
            files[split] = str(data_dir / f"{split}.jsonl")
            write_rows(files[split], [{cfg.text_column: e.text,
                                       cfg.label_column: data.labels[e.label]}
                                      for e in data.splits[split]], "jsonl")
    tree = config.to_dict()
    tree["data"].update(train=None, validation=files.get("validation"),
                        test=files.get("test"), format="auto", labels=list(data.labels),
                        validation_ratio=0.0, test_ratio=0.0, max_train_rows=None)
    return tree


def _write_pseudo_rows(path: Path, report: RoundReport, texts: list[str],
                       gold: list[int | None] | None, labels: list[str]) -> None:
    """The rows a round added, for a person to inspect: text, pseudo-label, confidence (and
    the file's own label when it had one)."""
    from tunelab.data.readers import write_rows

    if not report.added_rows:
        return
    write_rows(path, [{"text": texts[i], "pseudo_label": labels[y],
                       "confidence": round(c, 6),
                       **({"gold_label": None if gold[i] is None else labels[gold[i]]}
                          if gold is not None else {})}
                      for i, y, c in report.added_rows], "jsonl")


def write_rounds(out: Path, reports: list[RoundReport], labels: list[str],
                 settings: SelfTrainSettings, source: str, recipe: str | None) -> None:
    from tunelab.io import atomic_write_json, atomic_write_text

    rounds = [{**rep.to_dict(labels), "run_dir": str(out / f"round-{rep.round}")}
              for rep in reports]
    atomic_write_json(out / "rounds.json", {
        "recipe": recipe, "unlabelled": source, "labels": labels,
        "settings": dataclasses.asdict(settings), "rounds": rounds,
        "final_run": rounds[-1]["run_dir"]})
    lines = [f"Self-training on {source}: threshold {settings.threshold}, at most "
             f"{settings.per_class} rows per class per round.", "",
             "| round | pseudo rows | added per class | pseudo-label accuracy | "
             "test accuracy | test macro-F1 | run |", "|---|---|---|---|---|---|---|"]
    for rep, row in zip(reports, rounds):
        added = ", ".join(f"{k} {v}" for k, v in row["added"].items()) or "-"
        acc = "-" if rep.pseudo_accuracy is None else f"{rep.pseudo_accuracy:.4f}"
        test = rep.test or {}
        figures = [f"{test[k]:.4f}" if k in test else "-" for k in ("accuracy", "macro_f1")]
        lines.append(f"| {rep.round} | {rep.pseudo} | {added} | {acc} | {' | '.join(figures)} "
                     f"| {row['run_dir']} |")
    if reports[-1].stopped:
        lines += ["", f"Stopped after round {reports[-1].round}: {reports[-1].stopped}."]
    atomic_write_text(out / "rounds.md", "\n".join(lines) + "\n")
