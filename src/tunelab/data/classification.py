"""Text classification data: files -> checked, labelled, split examples plus a preflight report.

`load_classification_data(cfg.data)` reads the train/validation/test files (or the packaged
SST-2 demo when none is given), maps labels to ids, drops unusable rows (each one recorded as
a `Problem` with file, line and column), holds out validation/test rows by ratio when no
file is given, and refuses data that cannot train (an empty split, a single class).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tunelab.config import DataConfig
from tunelab.data.readers import Row, detect_format, read_rows
from tunelab.errors import DataError

SPLITS = ("train", "validation", "test")
DEMO_FILES = {"train": "sst2_train.csv", "validation": "sst2_validation.csv",
              "test": "sst2_test.csv"}
MAX_PREFLIGHT_PROBLEMS = 50


@dataclass
class Example:
    text: str
    label: int
    """Id into ClassificationData.labels; -1 when the row has no label (prediction input)."""
    text_pair: str | None = None
    source: str = ""
    """Where the row came from: "path:line"."""


@dataclass
class Problem:
    """A row that was dropped, and why."""

    file: str
    line: int
    column: str | None
    reason: str
    """"empty text", "missing text", "missing label", "unknown label 'X'", "bad encoding",
    "empty text pair", "missing text pair" or "wrong number of fields (N, header has M)"."""

    def where(self) -> str:
        place = f"{self.file}:{self.line}"
        return f"{place} column '{self.column}'" if self.column else place

    def kind(self) -> str:
        """The reason without its details: "unknown label 'x'" -> "unknown label"."""
        return re.split(r" '| \(", self.reason, maxsplit=1)[0]


@dataclass
class ClassificationData:
    labels: list[str]
    splits: dict[str, list[Example]]
    """"train", "validation", "test" in that order (only those present)."""
    problems: list[Problem]
    sources: dict[str, str]
    """Split -> where its rows came from, for people ("10% of data/train.csv (seed 42)")."""

    def preflight(self) -> dict:
        """A JSON-able summary: rows per split and class, dropped rows and their reasons."""
        splits = {}
        for name, examples in self.splits.items():
            counts = Counter(e.label for e in examples)
            splits[name] = {"rows": len(examples),
                            "per_class": {label: counts[i] for i, label in enumerate(self.labels)},
                            "source": self.sources.get(name, "")}
        return {"labels": list(self.labels),
                "splits": splits,
                "dropped": dict(Counter(p.kind() for p in self.problems)),
                "problems": [dataclasses.asdict(p)
                             for p in self.problems[:MAX_PREFLIGHT_PROBLEMS]],
                "problems_total": len(self.problems)}


# --------------------------------------------------------------------------------------------
# reading one file


@dataclass
class _Item:
    """A row that passed the text checks; its label is still the raw string."""

    example: Example
    raw_label: str | None
    file: str
    line: int


def _columns(cfg: DataConfig, need_label: bool) -> list[tuple[str, str]]:
    """(config key, column name) of the columns a file must have."""
    columns = [("text_column", cfg.text_column)]
    if cfg.text_pair_column:
        columns.append(("text_pair_column", cfg.text_pair_column))
    if need_label:
        columns.append(("label_column", cfg.label_column))
    return columns


def _rows(path: str, cfg: DataConfig, format: str) -> tuple[str, Iterator[Row]]:
    """(format, rows); 'LABEL text' rows are renamed to the configured column names."""
    fmt = detect_format(path) if format == "auto" else format
    rows = read_rows(path, fmt)
    if fmt == "labeltext":
        rows = (Row({cfg.label_column: r.values["label"], cfg.text_column: r.values["text"]},
                    r.line, r.bad_encoding) for r in rows)
    return fmt, rows


def _check_columns(path: str, fmt: str, seen: dict, cfg: DataConfig, need_label: bool,
                   n_rows: int) -> None:
    """One clear error when a configured column appears in no row of the file."""
    if n_rows == 0:
        raise DataError("file has no data rows", file=path)
    for key, column in _columns(cfg, need_label):
        if column not in seen:
            names = ", ".join(_shorten(c) for c in seen) or "(none)"
            hint = ""
            if fmt in ("csv", "tsv") and any(re.fullmatch(r"-?\d+(\.\d+)?", c) for c in seen):
                hint = " (the first line looks like data: csv/tsv files need a header row)"
            raise DataError(f"file {path} has no column '{column}'; its columns are: "
                            f"{names}{hint}. Set data.{key}=<column name>")


def _shorten(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _text_problem(row: Row, cfg: DataConfig,
                  check_encoding: bool = True) -> tuple[str | None, str] | None:
    """(column, reason) when the row cannot be used, else None."""
    if row.bad_encoding and check_encoding:
        bad = [c for c, v in row.values.items() if isinstance(v, str) and "\ufffd" in v]
        return (bad[0] if bad else None), "bad encoding"
    checks = [(cfg.text_column, "text")]
    if cfg.text_pair_column:
        checks.append((cfg.text_pair_column, "text pair"))
    for column, name in checks:
        value = row.values.get(column)
        if value is None:
            return column, f"missing {name}"
        if not str(value).strip():
            return column, f"empty {name}"
    if row.extra:
        fields = len(row.values) + len(row.extra)
        return None, f"wrong number of fields ({fields}, header has {len(row.values)})"
    return None


def _read_items(path: str, cfg: DataConfig, format: str, problems: list[Problem],
                name: str | None = None) -> list[_Item]:
    """Read a file into items; rows with bad text become Problems named after `name`."""
    path_name = name or path
    fmt, rows = _rows(path, cfg, format)
    items, seen, n_rows = [], {}, 0
    for row in rows:
        n_rows += 1
        seen.update(dict.fromkeys(row.values))
        problem = _text_problem(row, cfg)
        if problem is not None:
            problems.append(Problem(path_name, row.line, *problem))
            continue
        pair = row.values.get(cfg.text_pair_column) if cfg.text_pair_column else None
        example = Example(text=str(row.values[cfg.text_column]),
                          label=-1,
                          text_pair=None if pair is None else str(pair),
                          source=f"{path_name}:{row.line}")
        items.append(_Item(example, normalize_label(row.values.get(cfg.label_column)),
                           path_name, row.line))
    _check_columns(path_name, fmt, seen, cfg, True, n_rows)
    return items


def normalize_label(value: Any) -> str | None:
    """Raw label -> string: 1, 1.0, "1" and " 1 " all -> "1"; None, "" and NaN -> None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:  # NaN: a missing value in pandas-written files
            return None
        return str(int(value)) if value.is_integer() else str(value)
    text = str(value).strip()
    if re.fullmatch(r"-?\d+\.0*", text):
        text = text.split(".")[0]
    return text or None


# --------------------------------------------------------------------------------------------
# labels


def _label_list(cfg: DataConfig, train: list[_Item]) -> list[str]:
    if cfg.labels is not None:
        labels = [str(label).strip() for label in cfg.labels]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise DataError(f"data.labels names {duplicates[0]!r} more than once")
        return labels
    found = {item.raw_label for item in train if item.raw_label is not None}
    if found and all(re.fullmatch(r"-?\d+", label) for label in found):
        return sorted(found, key=int)
    return sorted(found)


def _assign_labels(items: list[_Item], labels: list[str], ids_allowed: bool,
                   problems: list[Problem], cfg: DataConfig) -> list[Example]:
    """Set each example's label id; rows with a missing or unknown label become Problems."""
    index = {label: i for i, label in enumerate(labels)}
    examples = []
    for item in items:
        raw = item.raw_label
        label_id = index.get(raw) if raw is not None else None
        if label_id is None and ids_allowed and raw is not None and re.fullmatch(r"\d+", raw):
            label_id = int(raw) if int(raw) < len(labels) else None
        if label_id is None:
            reason = "missing label" if raw is None else f"unknown label '{raw}'"
            problems.append(Problem(item.file, item.line, cfg.label_column, reason))
            continue
        item.example.label = label_id
        examples.append(item.example)
    return examples


# --------------------------------------------------------------------------------------------
# splits


def _allocate(weights: dict[int, int], caps: dict[int, int], n: int) -> dict[int, int]:
    """Share n slots among classes in proportion to `weights` (largest remainder), at most
    caps[c] each, and at least one for every class with room when n covers all classes."""
    total = sum(weights.values()) or 1
    shares = {c: n * weights[c] / total for c in weights}
    take = {c: min(int(shares[c]), caps[c]) for c in weights}
    if n >= len(weights):
        take = {c: max(take[c], min(1, caps[c])) for c in take}
    left = n - sum(take.values())
    # Hand out what is left to the classes furthest below their share, and take back any
    # excess (from the at-least-one rule) from those furthest above it.
    while left > 0:
        open_ = [c for c in take if take[c] < caps[c]]
        if not open_:
            break
        c = min(open_, key=lambda c: (take[c] - shares[c], c))
        take[c] += 1
        left -= 1
    while left < 0:
        c = max((c for c in take if take[c] > 1), key=lambda c: (take[c] - shares[c], -c))
        take[c] -= 1
        left += 1
    return take


def _by_class(examples: list[Example], rng: random.Random) -> dict[int, list[int]]:
    """Label id -> shuffled indices of its examples (classes visited in id order)."""
    groups: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.label, []).append(i)
    for label in sorted(groups):
        rng.shuffle(groups[label])
    return dict(sorted(groups.items()))


def split_by_ratio(examples: list[Example], ratios: dict[str, float],
                   seed: int) -> dict[str, list[Example]]:
    """Hold out `ratios` (split name -> share) of the examples, stratified by label.

    Deterministic for a seed. Every split keeps file order; "train" gets the rest and keeps
    at least one example of each class.
    """
    remaining = _by_class(examples, random.Random(seed))
    counts = {label: len(indices) for label, indices in remaining.items()}
    chosen: dict[str, list[int]] = {}
    for name, ratio in ratios.items():
        if ratio <= 0:
            continue
        n = max(1, round(len(examples) * ratio))
        caps = {label: max(0, len(indices) - 1) for label, indices in remaining.items()}
        take = _allocate(counts, caps, n)
        chosen[name] = [i for label in remaining for i in remaining[label][:take[label]]]
        remaining = {label: idx[take[label]:] for label, idx in remaining.items()}
    chosen["train"] = [i for indices in remaining.values() for i in indices]
    return {name: [examples[i] for i in sorted(indices)] for name, indices in chosen.items()}


def stratified_subsample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """At most n examples, classes in the same proportions, file order kept; deterministic."""
    if len(examples) <= n:
        return list(examples)
    groups = _by_class(examples, random.Random(seed))
    counts = {label: len(indices) for label, indices in groups.items()}
    take = _allocate(counts, counts, n)
    keep = sorted(i for label, indices in groups.items() for i in indices[:take[label]])
    return [examples[i] for i in keep]


def _percent(ratio: float) -> str:
    return f"{ratio * 100:.4g}%"


def hold_out(splits: dict, sources: dict, train_name: str, cfg: DataConfig) -> None:
    """Fill the validation/test splits that have no file from the training rows."""
    ratios = {}
    if "validation" not in splits and cfg.validation_ratio > 0:
        ratios["validation"] = cfg.validation_ratio
    if "test" not in splits and cfg.test_ratio > 0:
        ratios["test"] = cfg.test_ratio
    if not ratios:
        return
    parts = split_by_ratio(splits["train"], ratios, cfg.split_seed)
    for name, ratio in ratios.items():
        splits[name] = parts[name]
        sources[name] = f"{_percent(ratio)} of {train_name} (seed {cfg.split_seed})"
        if not parts[name]:
            raise DataError(f"the {name} split is empty: {len(splits['train'])} usable rows are "
                            f"too few to hold out {_percent(ratio)}; give data.{name} or use "
                            f"more rows", file=train_name)
    kept = 1 - sum(ratios.values())
    sources["train"] = f"{_percent(kept)} of {train_name} (seed {cfg.split_seed})"
    splits["train"] = parts["train"]


# --------------------------------------------------------------------------------------------
# loading


def _demo_path(split: str) -> str:
    return str(importlib.resources.files("tunelab.demo") / DEMO_FILES[split])


def _files(cfg: DataConfig) -> tuple[dict[str, tuple[str, str]], DataConfig]:
    """Split -> (path to read, name to show), and the config to read them with."""
    if cfg.train is None:
        if cfg.validation is not None or cfg.test is not None:
            raise DataError("data.train is required when data.validation or data.test is set")
        demo = {split: (_demo_path(split), f"demo/{name}") for split, name in DEMO_FILES.items()}
        return demo, dataclasses.replace(cfg, text_column="text", text_pair_column=None,
                                         label_column="label", format="auto")
    given = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    return {split: (path, path) for split, path in given.items() if path is not None}, cfg


def load_classification_data(cfg: DataConfig) -> ClassificationData:
    """Read, check, label and split the data described by `cfg` (see DataConfig)."""
    files, read_cfg = _files(cfg)
    demo = cfg.train is None
    problems: dict[str, list[Problem]] = {}
    items = {}
    for split, (path, name) in files.items():
        problems[split] = []
        items[split] = _read_items(path, read_cfg, read_cfg.format, problems[split], name=name)
    labels = _label_list(cfg, items["train"])
    splits = {split: _assign_labels(items[split], labels, cfg.labels is not None,
                                    problems[split], read_cfg) for split in items}
    for split, (path, name) in files.items():
        if not splits[split]:
            raise DataError(no_rows_message(problems[split]), file=name)
    sources = {split: (f"packaged demo: SST-2 sample ({len(splits[split])} rows)" if demo
                       else name) for split, (path, name) in files.items()}
    if not demo:
        hold_out(splits, sources, cfg.train, cfg)
    if cfg.max_train_rows is not None and len(splits["train"]) > cfg.max_train_rows:
        total = len(splits["train"])
        splits["train"] = stratified_subsample(splits["train"], cfg.max_train_rows,
                                               cfg.split_seed)
        sources["train"] += (f"; {cfg.max_train_rows} of its {total} rows "
                             f"(stratified sample, seed {cfg.split_seed})")
    _check_classes(splits["train"], labels, files["train"][1])
    ordered = {split: splits[split] for split in SPLITS if split in splits}
    all_problems = [p for split in SPLITS if split in problems
                    for p in sorted(problems[split], key=lambda p: p.line)]
    return ClassificationData(labels, ordered, all_problems,
                              {split: sources[split] for split in ordered})


def no_rows_message(problems: list[Problem]) -> str:
    if not problems:
        return "no usable rows"
    kinds = Counter(p.kind() for p in problems).most_common(3)
    top = ", ".join(f"{n} {kind}" for kind, n in kinds)
    first = problems[0]
    return (f"no usable rows ({len(problems)} dropped: {top}; first: line {first.line}"
            f"{f' column {first.column!r}' if first.column else ''}: {first.reason})")


def _check_classes(train: list[Example], labels: list[str], name: str) -> None:
    present = sorted({e.label for e in train})
    if len(present) < 2:
        found = ", ".join(repr(labels[i]) for i in present) or "none"
        raise DataError(f"the training data has {len(present)} class ({found}); "
                        f"classification needs at least 2", file=name)


# --------------------------------------------------------------------------------------------
# reports and prediction inputs


def problem_lines(problems: list[Problem], unit: str, max_problems: int = 10) -> list[str]:
    """'Dropped N <unit>:' then each reason with its count and the first rows' places."""
    if not problems:
        return [f"No {unit} dropped."]
    lines = [f"Dropped {len(problems)} {unit}:"]
    groups: dict[str, list[Problem]] = {}
    for problem in problems:
        groups.setdefault(problem.kind(), []).append(problem)
    for kind, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {kind}: {len(group)}")
        lines += [f"    {p.where()}: {p.reason}" for p in group[:max_problems]]
        if len(group) > max_problems:
            lines.append(f"    ... and {len(group) - max_problems} more")
    return lines


def format_preflight(data: ClassificationData, max_problems: int = 10) -> str:
    """A readable report: rows per split and class, sources, then dropped rows by reason."""
    names = list(data.splits)
    counts = {name: Counter(e.label for e in data.splits[name]) for name in names}
    table = [[""] + names]
    for i, label in enumerate(data.labels):
        table.append([label] + [str(counts[name][i]) for name in names])
    table.append(["total"] + [str(len(data.splits[name])) for name in names])
    widths = [max(len(row[col]) for row in table) for col in range(len(table[0]))]
    lines = [f"Data: {len(data.labels)} labels"]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  " + "  ".join(cells).rstrip())
    lines.append("Sources:")
    width = max(len(name) for name in names)
    lines += [f"  {name.ljust(width)}  {data.sources.get(name, '')}" for name in names]
    lines += problem_lines(data.problems, "rows", max_problems)
    return "\n".join(lines)


def read_prediction_inputs(path: str, cfg: DataConfig,
                           format: str = "auto") -> tuple[list[Row], list[Example]]:
    """Rows to predict, kept whole (outputs repeat every input column), and their Examples.

    Labels are not read (every Example has label -1), so the label column may be absent.
    No row is dropped: a row without usable text is a DataError naming file, line and column.
    Rows with undecodable bytes are kept (row.bad_encoding says which).
    """
    path = str(path)
    fmt, rows = _rows(path, cfg, format)
    rows = list(rows)
    seen = {column: None for row in rows for column in row.values}
    _check_columns(path, fmt, seen, cfg, False, len(rows))
    examples = []
    for row in rows:
        problem = _text_problem(row, cfg, check_encoding=False)
        if problem is not None:
            column, reason = problem
            if reason.startswith(("missing", "empty")):
                reason += "; every row to predict needs a text"
            raise DataError(reason, file=path, line=row.line, column=column)
        pair = row.values.get(cfg.text_pair_column) if cfg.text_pair_column else None
        examples.append(Example(text=str(row.values[cfg.text_column]), label=-1,
                                text_pair=None if pair is None else str(pair),
                                source=f"{path}:{row.line}"))
    return rows, examples


def load_labeled_file(path: str, cfg: DataConfig, labels: list[str],
                      format: str = "auto") -> tuple[list[Example], list[Problem]]:
    """A labelled file read against a trained run's labels (for `tunelab eval`): rows with an
    unknown or missing label are returned as Problems, the rest as Examples."""
    problems: list[Problem] = []
    items = _read_items(path, cfg, format, problems)
    examples = _assign_labels(items, labels, cfg.labels is not None, problems, cfg)
    if not examples:
        raise DataError(no_rows_message(problems), file=path)
    return examples, problems
