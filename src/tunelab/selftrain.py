"""Self-training: label unlabelled text with the model, keep the confident rows, retrain.

Each round the current model scores (a seeded sample of) the unlabelled rows; per class, the
rows it predicts most confidently (at least `threshold`, at most `per_class` of them) join the
training set with their predicted label, and a fresh model is trained from the base on the
labelled plus all pseudo-labelled rows. The per-class cap keeps the added rows balanced: a
model that favours one class would otherwise feed itself mostly that class and drift further
towards it. Training from the base model each round, rather than continuing, keeps early
pseudo-label mistakes from compounding in the weights.

Literature: Xie et al. 2020, "Self-training with Noisy Student improves ImageNet
classification" (arXiv 1911.04252: confident, class-balanced pseudo-labels, a fresh student
each round); Du et al. 2021, "Self-training Improves Pre-training for Natural Language
Understanding" (arXiv 2010.02194: per-class top-k selection on in-domain unlabelled text);
SetFit's authors report the same recipe on top of SetFit (Tunstall et al. 2022, arXiv
2209.11055).

Two learners use the same loop (`self_train`):
- `fewshot-eval --methods selftrain`: a SetFit classifier (tunelab.fewshot) per round.
- `tunelab self-train`: a `tunelab train` run per round (`RunLearner`); every round is a normal
  run directory, the last one the model to use.
"""
from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from tunelab.errors import ConfigError, DataError


@dataclass
class SelfTrainSettings:
    rounds: int = 3
    """Self-training rounds after the first model (trained on the labelled rows alone): each
    pseudo-labels, then trains a fresh model, so rounds + 1 models are trained in all."""
    threshold: float = 0.7
    """A row is pseudo-labelled only when the model gives its predicted class at least this
    probability. With many classes probabilities spread out: lower it (0.4-0.5 for 15)."""
    per_class: int = 32
    """At most this many rows per class join the training set per round (the most confident
    ones), so that the added rows stay balanced across classes."""
    sample_unlabelled: int | None = 5000
    """Score at most this many unlabelled rows per round (a seeded sample of the rows not yet
    added); unset = every row. Scoring is a forward pass per row, so a large pile costs time
    every round."""
    seed: int = 0
    """Seed of the per-round samples of unlabelled rows."""
    unlabelled: str | None = None
    """The unlabelled file (fewshot-eval's `selftrain.unlabelled`; `tunelab self-train` takes
    --unlabelled). Read with the recipe's data.text_column; when it also has the recipe's
    label column, those labels are never trained on, only used to report how accurate the
    pseudo-labels were. fewshot-eval also takes `pool`: the pool's rows outside the k x C
    sample, their labels unused (the rest of the training set, as in the self-training
    experiments of the few-shot literature)."""

    def __post_init__(self):
        if self.rounds < 0:
            raise ConfigError(f"selftrain.rounds must be 0 or more, got {self.rounds}")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"selftrain.threshold must be in [0, 1), got {self.threshold}")
        if self.per_class <= 0:
            raise ConfigError(f"selftrain.per_class must be positive, got {self.per_class}")
        if self.sample_unlabelled is not None and self.sample_unlabelled <= 0:
            raise ConfigError("selftrain.sample_unlabelled must be positive (or unset for all "
                              f"rows), got {self.sample_unlabelled}")


def selftrain_settings(values: dict) -> SelfTrainSettings:
    """From a plain dict (a recipe's `selftrain:` section or selftrain.* overrides)."""
    from tunelab.config import build_dataclass

    return build_dataclass(SelfTrainSettings, values, "selftrain")


class Learner(Protocol):
    def fit(self, texts: list[str], labels: list[int]) -> object: ...

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N, C) probabilities, columns in label-id order."""


@dataclass
class RoundReport:
    round: int
    """0: trained on the labelled rows alone; r: after r rounds of pseudo-labelling."""
    labelled: int
    """Labelled rows trained on (the same every round)."""
    pseudo: int
    """Pseudo-labelled rows trained on, this round's included."""
    added: dict[int, int]
    """Label id -> pseudo-labelled rows that joined this round (chosen by the previous model)."""
    pseudo_accuracy: float | None = None
    """Share of this round's added rows whose pseudo-label equals the unlabelled file's own
    label; None when the file has no labels (or in round 0)."""
    scored: int = 0
    """Unlabelled rows the previous model scored to choose this round's additions."""
    test: dict | None = None
    """Test metrics of this round's model, when a test set was given."""
    seconds: float = 0.0
    """Training, testing and pseudo-labelling time of this round."""
    stopped: str | None = None
    """Why self-training ended before `rounds` (set on the last report only)."""
    added_rows: list[tuple[int, int, float]] = field(default_factory=list, repr=False)
    """(index into the unlabelled texts, pseudo-label id, confidence) of the added rows."""

    def to_dict(self, labels: list[str] | None = None) -> dict:
        """JSON-able, with label names as keys when `labels` is given; added_rows left out."""
        name = (lambda i: labels[i]) if labels else str
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "added_rows"}
        out["added"] = {name(k): v for k, v in sorted(self.added.items())}
        return out


def select_confident(probs: np.ndarray, threshold: float,
                     per_class: int) -> list[tuple[int, int, float]]:
    """(row, predicted label, confidence) of the rows to pseudo-label: per predicted class the
    `per_class` most confident rows whose confidence is at least `threshold`."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    chosen = []
    for label in range(probs.shape[1]):
        rows = np.flatnonzero((predicted == label) & (confidence >= threshold))
        rows = rows[np.argsort(-confidence[rows], kind="stable")][:per_class]
        chosen += [(int(i), label, float(confidence[i])) for i in rows]
    return chosen


def self_train(make_learner: Callable[[int], Learner], labelled_texts: list[str],
               labelled_y: list[int], unlabelled_texts: list[str], settings: SelfTrainSettings,
               test: Callable[[Learner], dict] | None = None,
               on_round: Callable[[RoundReport, Learner], None] | None = None,
               unlabelled_gold: list[int | None] | None = None) -> list[RoundReport]:
    """Train `make_learner(0)` on the labelled rows, then for each round pseudo-label, train
    `make_learner(r)` from scratch on labelled + pseudo-labelled rows. `test(learner)` gives
    each round's test metrics; `on_round(report, learner)` is called after each round;
    `unlabelled_gold` (label id or None per unlabelled text) is only used to report accuracy.
    Returns one report per trained model; fewer than rounds + 1 when no row is left to add."""
    if len(labelled_texts) != len(labelled_y):
        raise DataError(f"{len(labelled_texts)} labelled texts but {len(labelled_y)} labels")
    if unlabelled_gold is not None and len(unlabelled_gold) != len(unlabelled_texts):
        raise DataError(f"{len(unlabelled_texts)} unlabelled texts but {len(unlabelled_gold)} "
                        "gold labels")
    pool = list(range(len(unlabelled_texts)))  # rows not pseudo-labelled yet
    pseudo: list[tuple[int, int, float]] = []
    added: list[tuple[int, int, float]] = []
    scored, reports = 0, []
    for r in range(settings.rounds + 1):
        start = time.perf_counter()
        learner = make_learner(r)
        learner.fit(list(labelled_texts) + [unlabelled_texts[i] for i, _, _ in pseudo],
                    list(labelled_y) + [y for _, y, _ in pseudo])
        report = RoundReport(round=r, labelled=len(labelled_texts), pseudo=len(pseudo),
                             added=_count(y for _, y, _ in added),
                             pseudo_accuracy=_pseudo_accuracy(added, unlabelled_gold),
                             scored=scored, added_rows=added)
        report.test = test(learner) if test is not None else None
        if r < settings.rounds:
            scored, added, report.stopped = _next_rows(learner, unlabelled_texts, pool,
                                                       settings, r)
            pseudo += added
            taken = {i for i, _, _ in added}
            pool = [i for i in pool if i not in taken]
        report.seconds = round(time.perf_counter() - start, 2)
        reports.append(report)
        if on_round is not None:
            on_round(report, learner)
        if report.stopped:
            break
    return reports


def _next_rows(learner: Learner, texts: list[str], pool: list[int], settings: SelfTrainSettings,
               r: int) -> tuple[int, list[tuple[int, int, float]], str | None]:
    """(rows scored, rows to add as (text index, label, confidence), why to stop or None)."""
    if not pool:
        return 0, [], "every unlabelled row has been added"
    sample = pool
    if settings.sample_unlabelled is not None and len(pool) > settings.sample_unlabelled:
        rng = random.Random(f"selftrain-{settings.seed}-{r}")
        sample = sorted(rng.sample(pool, settings.sample_unlabelled))
    probs = np.asarray(learner.predict_proba([texts[i] for i in sample]))
    chosen = [(sample[i], y, c) for i, y, c in
              select_confident(probs, settings.threshold, settings.per_class)]
    if not chosen:
        return len(sample), [], (f"no scored row reached the threshold {settings.threshold} "
                                 f"(highest confidence {probs.max():.3f})")
    return len(sample), chosen, None


def _count(values) -> dict[int, int]:
    """Value -> occurrences, sorted by value."""
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _pseudo_accuracy(added: list[tuple[int, int, float]],
                     gold: list[int | None] | None) -> float | None:
    known = [(y, gold[i]) for i, y, _ in added if gold is not None and gold[i] is not None]
    if not known:
        return None
    return round(sum(y == g for y, g in known) / len(known), 4)


# --------------------------------------------------------------------------------------------
# the unlabelled file


POOL = "pool"
"""fewshot-eval's selftrain.unlabelled for the pool's unsampled rows."""


@dataclass
class Unlabelled:
    texts: list[str]
    """Distinct texts in file order (a repeated text is kept once)."""
    raw_labels: list[str | None]
    """The file's own label per text when it has the label column (benchmarks), else None."""
    source: str
    """Where the rows came from, for people."""


def load_unlabelled(path: str, data_cfg, exclude: set[str] = frozenset()) -> Unlabelled:
    """The texts of `path` read with the recipe's columns, minus repeats and the texts in
    `exclude` (the labelled and test rows). A row without text is a DataError at file:line."""
    from tunelab.data.classification import normalize_label, read_prediction_inputs

    if data_cfg.text_pair_column:
        raise ConfigError("self-training pseudo-labels single texts; this recipe has text "
                          "pairs (data.text_pair_column)")
    rows, examples = read_prediction_inputs(str(path), data_cfg)
    seen, texts, raw = set(exclude), [], []
    for row, example in zip(rows, examples):
        if example.text in seen:
            continue
        seen.add(example.text)
        texts.append(example.text)
        raw.append(normalize_label(row.values.get(data_cfg.label_column)))
    if not texts:
        raise DataError("every unlabelled row is a repeat or already labelled (or in the test "
                        "set): nothing to pseudo-label", file=str(path))
    dropped = len(rows) - len(texts)
    return Unlabelled(texts, raw, f"{path} ({len(texts)} rows"
                      + (f"; {dropped} repeated or labelled rows left out)" if dropped else ")"))


def pool_unlabelled(pool, labels: list[str], source: str) -> Unlabelled:
    """fewshot-eval's pool as the unlabelled pile (`selftrain.unlabelled: pool`): its distinct
    texts, their labels kept only to report pseudo-label accuracy. The sampled rows are left
    out per seed by fewshot_selftrain."""
    first = {e.text: labels[e.label] for e in reversed(pool)}
    texts = list(dict.fromkeys(e.text for e in pool))
    return Unlabelled(texts, [first[t] for t in texts],
                      f"the pool, {source} ({len(texts)} rows, labels unused)")


def gold_ids(raw_labels: list[str | None], labels: list[str],
             ids_allowed: bool) -> list[int | None] | None:
    """Label ids of the unlabelled file's own labels (None where unknown), or None when the
    file has none. ids_allowed: integer labels i mean labels[i] (data.labels was given)."""
    if all(raw is None for raw in raw_labels):
        return None
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for raw in raw_labels:
        label_id = index.get(raw) if raw is not None else None
        if label_id is None and ids_allowed and raw is not None and raw.isdigit():
            label_id = int(raw) if int(raw) < len(labels) else None
        out.append(label_id)
    return out


def check_not_test(path: str, data_cfg) -> None:
    """Refuse an unlabelled file that is (or holds) the test set: pseudo-labelling the test
    rows would let the model train on them, and the test score would no longer mean much."""
    def same(a):
        return a is not None and Path(a).resolve() == Path(path).resolve()

    if same(data_cfg.test):
        raise ConfigError(f"the unlabelled file {path} is the test file (data.test): "
                          "self-training on the test set would leak it into training")
    if data_cfg.test is None and data_cfg.test_ratio > 0 and same(data_cfg.train):
        raise ConfigError(f"the unlabelled file {path} is data.train, which the test rows are "
                          "held out of (data.test_ratio): its rows include the test set")


# --------------------------------------------------------------------------------------------
# fewshot-eval: SetFit per round


def fewshot_selftrain(plan, labels: list[str], sample, test, seed: int) -> dict:
    """fewshot-eval's `selftrain` method: SetFit on the k x C sample, then self-training on
    the plan's unlabelled rows. The final round's test metrics, with every round under
    "rounds"."""
    import torch

    from tunelab.fewshot import SetFitClassifier
    from tunelab.fewshot_eval import test_metrics

    settings = dataclasses.replace(plan.selftrain, seed=seed)
    setfit = dataclasses.replace(plan.setfit, seed=seed)
    known = {e.text for e in sample} | {e.text for e in test}
    keep = [i for i, t in enumerate(plan.unlabelled.texts) if t not in known]
    texts = [plan.unlabelled.texts[i] for i in keep]
    gold = gold_ids([plan.unlabelled.raw_labels[i] for i in keep], labels,
                    plan.config.data.labels is not None)
    test_texts = [e.text for e in test]
    reports = self_train(
        lambda r: SetFitClassifier(plan.config.model.name, labels, setfit),
        [e.text for e in sample], [e.label for e in sample], texts, settings,
        test=lambda clf: test_metrics(torch.from_numpy(clf.predict_proba(test_texts)), test,
                                      labels),
        on_round=lambda report, _: print(f"  selftrain round {format_round(report, labels)}",
                                         file=sys.stderr, flush=True),
        unlabelled_gold=gold)
    final = dict(reports[-1].test)
    final["rounds"] = [_brief(rep.to_dict(labels)) for rep in reports]
    return final


def _brief(report: dict) -> dict:
    """A round for results.json: accuracy and macro-F1 of its test metrics, not every figure."""
    test = report.pop("test") or {}
    return {**report, **{f"test_{k}": test[k] for k in ("accuracy", "macro_f1") if k in test}}


def format_round(report: RoundReport, labels: list[str]) -> str:
    """'2: 16 labelled + 64 pseudo rows (added negative 32, positive 32; pseudo-label accuracy
    0.91); test accuracy 0.8123 (41.2 s)'."""
    parts = [f"{report.round}: {report.labelled} labelled + {report.pseudo} pseudo rows"]
    if report.round:
        added = ", ".join(f"{labels[k]} {v}" for k, v in report.added.items()) or "none"
        accuracy = ("" if report.pseudo_accuracy is None else
                    f"; pseudo-label accuracy {report.pseudo_accuracy:.4f}")
        parts.append(f" (added {added} of {report.scored} scored{accuracy})")
    if report.test:
        parts.append(f"; test accuracy {report.test['accuracy']:.4f}")
    parts.append(f" ({report.seconds} s)")
    if report.stopped:
        parts.append(f"; stopped: {report.stopped}")
    return "".join(parts)
