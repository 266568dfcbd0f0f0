"""Tagged data for token classification: files -> checked sentences in one tagging scheme.

Two kinds of files are read:
- CoNLL-style column files (.txt, .conll, .bio, .iob or data.format=conll): one token per
  line, whitespace-separated columns, a blank line between sentences, `-DOCSTART-` lines
  skipped. The token is column 0; the tags are in the last column whose values look like tags
  (O, B-X, I-X, E-X, S-X, U-X, L-X; most of them, so that typos are reported rather than
  hiding the column), so `EU B-ORG 0` (the shared CoNLL-2003 files) and
  `EU NNP B-NP B-ORG` (the original layout: the chunk column looks like tags too, NER is last)
  both work; `task.tag_column` overrides the guess.
- Rows (json, jsonl, parquet, csv, tsv) holding a list of tokens and a list of tags (fields
  `task.tokens_field` / `task.tags_field`); a space-separated string is read as a list, and
  integer tags are ids into `data.labels` (the Hugging Face datasets layout).

Every sentence is checked against the scheme (IOB1, IOB2 or BIOES; `auto` guesses it from the
training file). A sentence with a tag outside the scheme, a broken sequence (IOB2 `O I-PER`)
or, in validation/test, a tag the model cannot predict is dropped and recorded as a
`Problem` naming the file and line. IOB1 is converted to IOB2 and BILOU's U-/L- to S-/E-, so
the model always learns IOB2 or BIOES tags.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data.classification import (MAX_PREFLIGHT_PROBLEMS, SPLITS, Problem, hold_out,
                                         no_rows_message, problem_lines,
                                         stratified_subsample)
from tunelab.data.readers import EXTENSIONS, check_readable, numbered_lines, read_rows
from tunelab.data.tag_schemes import (TAG_RE, complete_tags, detect_scheme, entity_types, parse_tag,
                                      scheme_tag, to_scheme)
from tunelab.errors import DataError

CONLL_EXTENSIONS = (".txt", ".conll", ".bio", ".iob")
TAG_COLUMN_SHARE = 0.5
"""A CoNLL column holds the tags when more than this share of its values look like tags:
typos must not hide the column (they are reported as problems, with their line, instead)."""


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    """One tag per word, in the data's scheme (IOB2 or BIOES); empty for unlabelled input."""
    source: str = ""
    """Where the sentence starts: "path:line"."""

    @property
    def label(self) -> int:
        """The stratum of ratio splits and subsamples (data.classification's helpers): 1 when
        the sentence holds an entity, so held-out splits get their share of entity-free ones."""
        return int(any(t != "O" for t in self.tags))


@dataclass
class _Raw:
    """A sentence as read, before the scheme and label checks."""

    words: list[str]
    tags: list[str]
    lines: list[int]
    """Line of each token (rows: the row's line for every token)."""
    file: str
    column: str | None = None


def entity_counts(sentences: list[Sentence]) -> Counter:
    """Entities per type, conlleval semantics (seqeval.get_entities)."""
    from seqeval.metrics.sequence_labeling import get_entities

    return Counter(kind for s in sentences for kind, _, _ in get_entities(s.tags))


# --------------------------------------------------------------------------------------------
# reading files


def tagging_format(path: str, format: str) -> str:
    """The format of a tagged file: data.format, or conll for .txt/.conll/.bio/.iob files and
    the rows formats (json, jsonl, parquet, csv, tsv) from their extensions."""
    if format in ("labeltext", "text"):
        raise DataError(f"data.format={format} holds no tags; token classification reads conll "
                        f"files or json/jsonl/parquet/csv/tsv rows of tokens and tags", file=path)
    if format != "auto":
        return format
    suffix = Path(path).suffix.lower()
    if suffix in CONLL_EXTENSIONS:
        return "conll"
    if EXTENSIONS.get(suffix) not in (None, "labeltext"):
        return EXTENSIONS[suffix]
    raise DataError(f"cannot tell the format from the extension; token classification reads "
                    f"{', '.join(CONLL_EXTENSIONS)} (conll), .json, .jsonl, .parquet, .csv and "
                    f".tsv. Or set data.format", file=path)


def read_tagged(path: str, settings, format: str, need_tags: bool, id_labels=None
                ) -> tuple[list[_Raw], list[Problem], str]:
    """(sentences, problems, how the file was read) for one file; tags are not yet checked
    against a scheme. `id_labels` names integer tags (data.labels)."""
    path = str(path)
    fmt = tagging_format(path, format)
    problems: list[Problem] = []
    if fmt == "conll":
        raws, how = _read_conll(path, settings.tag_column, need_tags, problems)
    else:
        raws = _read_rows(path, fmt, settings, need_tags, id_labels, problems)
        how = f"{fmt}, fields '{settings.tokens_field}'" + (
            f" and '{settings.tags_field}'" if need_tags else "")
    return raws, problems, how


def _conll_blocks(path) -> list[list[tuple[int, list[str], bool]]]:
    """Sentences as lists of (line, columns, bad encoding); -DOCSTART- lines end a sentence."""
    check_readable(path)
    blocks, block = [], []
    for number, text, bad in numbered_lines(path):
        columns = text.split()
        if not columns or columns[0] == "-DOCSTART-":
            if block:
                blocks.append(block)
            block = []
            continue
        block.append((number, columns, bad))
    if block:
        blocks.append(block)
    return blocks


def find_tag_column(blocks) -> int | None:
    """The last column (not the tokens) in which most values look like tags."""
    tags: list[int] = []
    present: list[int] = []
    for block in blocks:
        for _, columns, _ in block:
            grow = [0] * (len(columns) - len(tags))
            tags, present = tags + grow, present + grow
            for c in range(1, len(columns)):
                present[c] += 1
                tags[c] += columns[c] == "O" or TAG_RE.fullmatch(columns[c]) is not None
    found = [c for c in range(1, len(tags)) if tags[c] > TAG_COLUMN_SHARE * present[c]]
    return max(found) if found else None


def _read_conll(name: str, tag_column: int | None, need_tags: bool,
                problems: list[Problem]) -> tuple[list[_Raw], str]:
    blocks = _conll_blocks(name)
    if not blocks:
        raise DataError("file has no token lines", file=name)
    column = tag_column if tag_column is not None else find_tag_column(blocks)
    if column is None and need_tags:
        first = " ".join(blocks[0][0][1])
        raise DataError(f"no column of tags found (a column whose values look like O, B-X, "
                        f"I-X ...; line {blocks[0][0][0]} reads '{first}'); give the column "
                        f"index with task.tag_column=N (0 = the tokens)", file=name)
    raws = []
    for block in blocks:
        lines = [number for number, _, _ in block]
        bad = next((number for number, _, is_bad in block if is_bad), None)
        short = next((b for b in block if column is not None and len(b[1]) <= column), None)
        if bad is not None and need_tags:  # text to tag is tagged as read, like classification
            problems.append(Problem(name, bad, None, "bad encoding"))
        elif need_tags and short is not None:
            problems.append(Problem(name, short[0], None, f"missing tag (the line has "
                                    f"{len(short[1])} column(s); tags are in column {column})"))
        else:
            tags = [columns[column] for _, columns, _ in block] if need_tags else []
            raws.append(_Raw([columns[0] for _, columns, _ in block], tags, lines, name))
    if column is None:
        return raws, "conll, tokens in column 0"
    how = "given" if tag_column is not None else "auto-detected"
    return raws, f"conll; tags: column {column}, {how}; tokens: column 0"


def _as_list(value, what: str) -> tuple[list | None, str | None]:
    """A token or tag list from a list or a space-separated string; (None, reason) if not."""
    if value is None:
        return None, f"missing {what}"
    if isinstance(value, str):
        value = value.split()
    elif hasattr(value, "tolist") and not isinstance(value, list):
        value = value.tolist()  # numpy arrays from parquet
    if not isinstance(value, (list, tuple)):
        return None, f"bad {what} (expected a list or a space-separated string, got " \
                     f"{type(value).__name__})"
    if not value:
        return None, f"empty {what}"
    return list(value), None


def _row_tags(tags: list, id_labels, name: str, line: int, field_name: str) -> list[str]:
    """Tag names; integer tags are ids into data.labels."""
    if not any(isinstance(t, int) and not isinstance(t, bool) for t in tags):
        return [str(t) for t in tags]
    if id_labels is None:
        raise DataError("tags are integer ids; set data.labels to the tag names in id order "
                        "(e.g. [O, B-PER, I-PER, ...])", file=name, line=line, column=field_name)
    out = []
    for t in tags:
        if isinstance(t, int) and not 0 <= t < len(id_labels):
            raise DataError(f"tag id {t} is out of range: data.labels names {len(id_labels)} "
                            f"tags", file=name, line=line, column=field_name)
        out.append(id_labels[t] if isinstance(t, int) else str(t))
    return out


def _read_rows(name: str, fmt: str, settings, need_tags: bool, id_labels,
               problems: list[Problem]) -> list[_Raw]:
    tokens_field, tags_field = settings.tokens_field, settings.tags_field
    raws, seen, n_rows = [], {}, 0
    for row in read_rows(name, fmt):
        n_rows += 1
        seen.update(dict.fromkeys(row.values))
        words, reason = _as_list(row.values.get(tokens_field), "tokens")
        column = tokens_field
        if reason is None and any(not isinstance(w, str) or not w.strip() for w in words):
            reason = "bad tokens (every token must be a non-empty string)"
        tags = []
        if reason is None and need_tags:
            tags, reason = _as_list(row.values.get(tags_field), "tags")
            column = tags_field
            if reason is None and len(tags) != len(words):
                reason = f"tokens and tags differ in length ({len(words)} tokens, {len(tags)} tags)"
        if reason is None and row.bad_encoding:
            column, reason = None, "bad encoding"
        if reason is not None:
            problems.append(Problem(name, row.line, column, reason))
            continue
        tags = _row_tags(tags, id_labels, name, row.line, tags_field)
        raws.append(_Raw(list(words), tags, [row.line] * len(words), name, tags_field))
    if n_rows == 0:
        raise DataError("file has no data rows", file=name)
    for key, column in [("tokens_field", tokens_field)] + ([("tags_field", tags_field)]
                                                          if need_tags else []):
        if column not in seen:
            names = ", ".join(seen) or "(none)"
            raise DataError(f"no row has a field '{column}'; the fields are: {names}. Set "
                            f"task.{key}=<field name>", file=name)
    return raws


def check_sentences(raws: list[_Raw], scheme: str, problems: list[Problem],
                    labels: list[str] | None = None) -> list[Sentence]:
    """Sentences whose tags fit `scheme` (converted) and, when given, `labels`; the others
    become Problems at the line of the first bad tag."""
    known = set(labels) if labels is not None else None
    sentences = []
    for raw in raws:
        tags, error = to_scheme(raw.tags, scheme)
        if error is None and known is not None:
            unknown = next((i for i, t in enumerate(tags) if t not in known), None)
            if unknown is not None:
                error = (unknown, f"unknown tag '{tags[unknown]}' (known tags: "
                                  f"{_shorten_list(labels)})")
        if error is not None:
            problems.append(Problem(raw.file, raw.lines[error[0]], raw.column, error[1]))
            continue
        sentences.append(Sentence(raw.words, tags, f"{raw.file}:{raw.lines[0]}"))
    return sentences


def _shorten_list(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# loading a run's data


@dataclass
class TaggingData:
    labels: list[str]
    splits: dict[str, list[Sentence]]
    """"train", "validation", "test" in that order (only those present)."""
    problems: list[Problem]
    sources: dict[str, str]
    scheme: str
    """The scheme of the tags the model learns: IOB2 or BIOES."""
    scheme_read: str
    """The scheme of the files: IOB1, IOB2 or BIOES."""
    truncation: dict[str, dict[str, int]] = field(default_factory=dict)
    """Split -> {"sentences", "entities"} that lose words to `max_length` (filled by the task,
    which has the tokenizer)."""
    max_length: int | None = None

    def preflight(self) -> dict:
        """A JSON-able summary: sentences, tokens and entities per type per split, dropped
        sentences by reason, and what truncation cuts."""
        types = entity_types(self.labels)
        splits = {}
        for name, sentences in self.splits.items():
            counts = entity_counts(sentences)
            splits[name] = {"sentences": len(sentences),
                            "tokens": sum(len(s.words) for s in sentences),
                            "entities": sum(counts.values()),
                            "per_type": {t: counts[t] for t in types},
                            "source": self.sources.get(name, ""),
                            **({f"truncated_{k}": v for k, v in self.truncation[name].items()}
                               if name in self.truncation else {})}
        return {"labels": list(self.labels), "scheme": self.scheme,
                "scheme_read": self.scheme_read, "types": types, "max_length": self.max_length,
                "splits": splits,
                "dropped": dict(Counter(p.kind() for p in self.problems)),
                "problems": [dataclasses.asdict(p)
                             for p in self.problems[:MAX_PREFLIGHT_PROBLEMS]],
                "problems_total": len(self.problems)}


def load_tagging_data(cfg: DataConfig, settings) -> TaggingData:
    """Read, check and split the tagged data described by `cfg` and the task settings."""
    if cfg.train is None:
        raise DataError("token classification needs data.train: a CoNLL file (one token and "
                        "its tag per line) or json/jsonl/parquet rows of tokens and tags")
    files = {split: path for split, path in
             {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}.items()
             if path is not None}
    raws, problems, sources = {}, {}, {}
    for split, path in files.items():
        raws[split], problems[split], how = read_tagged(path, settings, cfg.format, True,
                                                        cfg.labels)
        sources[split] = f"{path} ({how})"
    scheme_read = (settings.scheme if settings.scheme != "auto"
                   else detect_scheme(r.tags for r in raws["train"]))
    scheme = "IOB2" if scheme_read == "IOB1" else scheme_read
    labels = _label_list(cfg, raws["train"], scheme)
    splits = {split: check_sentences(raws[split], scheme_read, problems[split], labels)
              for split in files}
    for split, path in files.items():
        if not splits[split]:
            raise DataError(_no_sentences(problems[split]), file=path)
    hold_out(splits, sources, cfg.train, cfg)
    if cfg.max_train_rows is not None and len(splits["train"]) > cfg.max_train_rows:
        total = len(splits["train"])
        splits["train"] = stratified_subsample(splits["train"], cfg.max_train_rows,
                                               cfg.split_seed)
        sources["train"] += (f"; {cfg.max_train_rows} of its {total} sentences "
                             f"(sample, seed {cfg.split_seed})")
    if not any(s.label for s in splits["train"]):
        raise DataError("the training sentences hold no entity (every tag is O)", file=cfg.train)
    ordered = {split: splits[split] for split in SPLITS if split in splits}
    all_problems = [p for split in SPLITS if split in problems
                    for p in sorted(problems[split], key=lambda p: p.line)]
    return TaggingData(labels, ordered, all_problems, {s: sources[s] for s in ordered},
                       scheme, scheme_read)


def _no_sentences(problems: list[Problem]) -> str:
    return no_rows_message(problems).replace("usable rows", "usable sentences", 1)


def _label_list(cfg: DataConfig, train: list[_Raw], scheme: str) -> list[str]:
    """data.labels as given (checked), else every tag of the types found in training."""
    if cfg.labels is None:
        found = {parse_tag(t) for raw in train for t in raw.tags}
        return complete_tags(sorted({p[1] for p in found if p and p[0] != "O"}), scheme)
    labels = [str(label).strip() for label in cfg.labels]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise DataError(f"data.labels names {duplicates[0]!r} more than once")
    if "O" not in labels:
        raise DataError("data.labels must include the outside tag O")
    converted = []
    for label in labels:  # kept in order: integer tags in the data are ids into data.labels
        p = scheme_tag(label, scheme)
        if isinstance(p, str):
            raise DataError(f"data.labels: {p}")
        converted.append("O" if p[0] == "O" else f"{p[0]}-{p[1]}")
    return converted


def load_labeled_tagging_file(path: str, settings, labels: list[str], format: str = "auto"
                              ) -> tuple[list[Sentence], list[Problem]]:
    """A tagged file read against a trained run's tags (for `tunelab eval`): sentences with
    tags outside the scheme or the run's tags are returned as Problems."""
    raws, problems, _ = read_tagged(path, settings, format, True, labels)
    scheme = settings.scheme
    if scheme == "auto":
        scheme = detect_scheme(r.tags for r in raws)
        if scheme != "BIOES" and any(t[:2] in ("E-", "S-") for t in labels):
            scheme = "BIOES"  # a run trained on BIOES tags: the file must be BIOES too
    sentences = check_sentences(raws, scheme, problems, labels)
    if not sentences:
        raise DataError(_no_sentences(problems), file=path)
    return sentences, problems


# --------------------------------------------------------------------------------------------
# reports


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return ["  " + "  ".join([row[0].ljust(widths[0])] +
                             [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()
            for row in rows]


def format_preflight(data: TaggingData, max_problems: int = 10) -> str:
    """A readable report: entities per type and split, truncation, sources, dropped sentences."""
    summary = data.preflight()
    names = list(summary["splits"])
    split_info = summary["splits"]
    rows = [[""] + names]
    rows += [[t] + [str(split_info[n]["per_type"][t]) for n in names] for t in summary["types"]]
    for key in ("entities", "sentences", "tokens"):
        rows.append([key] + [str(split_info[n][key]) for n in names])
    if data.truncation:
        for key in ("sentences", "entities"):
            rows.append([f"{key} cut at {data.max_length} tokens"] +
                        [str(split_info[n].get(f"truncated_{key}", "-")) for n in names])
    converted = f", converted to {data.scheme}" if data.scheme != data.scheme_read else ""
    lines = [f"Data: {len(data.labels)} tags ({data.scheme_read}{converted}), "
             f"{len(summary['types'])} entity types; entities per type:"]
    lines += _table(rows)
    lines.append("Sources:")
    width = max(len(name) for name in names)
    lines += [f"  {name.ljust(width)}  {data.sources.get(name, '')}" for name in names]
    lines += problem_lines(data.problems, "sentences", max_problems)
    return "\n".join(lines)
