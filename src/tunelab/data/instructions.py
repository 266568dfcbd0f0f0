"""Instruction data: files -> checked conversations (lists of role/content messages) + preflight.

Three record layouts are read, recognised per record by their fields (names are task settings):

- Alpaca: ``{"instruction", "input", "output"}``, optional ``"system"`` and ``"history"``
  (earlier turns as ``[[prompt, response], ...]``). The user turn is the instruction, followed
  by the input after a blank line when there is one.
- Chat (OpenAI style): ``{"messages": [{"role": "system"|"user"|"assistant", "content"}]}``.
- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}``.

Files are JSON (a list of records), JSON lines, or csv/tsv/parquet with Alpaca columns. Every
dropped record becomes a `Problem` naming the file, the line (or the record's position for a
JSON list or parquet file) and the reason. Validation/test records come from their own files
or are held out from the training file by ratio, seeded (the classification helpers).
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tunelab.config import DataConfig
from tunelab.data.classification import (MAX_PREFLIGHT_PROBLEMS, SPLITS, Problem, hold_out,
                                         problem_lines, stratified_subsample)
from tunelab.data.readers import detect_format, read_rows
from tunelab.errors import DataError

FORMATS = ("json", "jsonl", "csv", "tsv", "parquet")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
"""ShareGPT `from` values -> roles. Tool and function turns are not supported."""


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    """[{"role", "content"}]: an optional system message, then user and assistant turns
    alternating, ending with an assistant turn (checked when read)."""
    style: str
    """The layout it was read from: alpaca, chat or sharegpt."""
    file: str = ""
    line: int = 0
    by_record: bool = False
    """`line` is the record's position in a JSON list or parquet file, not a line."""
    label: ClassVar[int] = 0
    """One stratum for the classification split helpers, which stratify by label."""

    @property
    def source(self) -> str:
        """Where the record came from: "path:line" or "path record N"."""
        return f"{self.file} record {self.line}" if self.by_record else f"{self.file}:{self.line}"

    def problem(self, reason: str) -> "RecordProblem":
        """This record as dropped for `reason` (after reading, e.g. when tokenised)."""
        return RecordProblem(self.file, self.line, None, reason, self.by_record)


@dataclass
class RecordProblem(Problem):
    """A dropped record. `by_record`: `line` is the record's 1-based position in a JSON list or
    parquet file (lines mean little in a pretty-printed JSON file)."""

    by_record: bool = False

    def where(self) -> str:
        place = f"{self.file} record {self.line}" if self.by_record else f"{self.file}:{self.line}"
        return f"{place} field '{self.column}'" if self.column else place


class RecordError(Exception):
    """Why a record cannot be used: `field` (or None) and a reason whose first words name the
    kind ("missing output", "roles out of order (...)")."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


@dataclass
class InstructionData:
    splits: dict[str, list[Conversation]]
    """"train", "validation", "test" in that order (only those present)."""
    problems: list[Problem]
    sources: dict[str, str]
    labels: ClassVar[list[str]] = []
    """Instruction tuning learns no label set (the loop asks every task's data for one)."""

    def preflight(self) -> dict:
        """A JSON-able summary: conversations and responses per split, dropped records."""
        splits = {}
        for name, conversations in self.splits.items():
            splits[name] = {"rows": len(conversations),
                            "responses": sum(_responses(c) for c in conversations),
                            "styles": dict(Counter(c.style for c in conversations)),
                            "source": self.sources.get(name, "")}
        return {"splits": splits,
                "dropped": dict(Counter(p.kind() for p in self.problems)),
                "problems": [dataclasses.asdict(p)
                             for p in self.problems[:MAX_PREFLIGHT_PROBLEMS]],
                "problems_total": len(self.problems)}


def _responses(conversation: Conversation) -> int:
    return sum(m["role"] == "assistant" for m in conversation.messages)


# --------------------------------------------------------------------------------------------
# one record -> messages


def _text(value, field: str, what: str, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise RecordError(field, f"missing {what}")
        return None
    if not isinstance(value, str):
        raise RecordError(field, f"{what} is not text ({type(value).__name__})")
    if required and not value.strip():
        raise RecordError(field, f"empty {what}")
    return value


def _alpaca(values: dict, fields, prompt_only: bool) -> list[dict]:
    instruction = _text(values.get(fields.instruction_field), fields.instruction_field,
                        "instruction")
    extra = _text(values.get(fields.input_field), fields.input_field, "input", required=False)
    history = values.get(fields.history_field) or []
    if not isinstance(history, list):
        raise RecordError(fields.history_field, f"bad history (not a list of [prompt, "
                                                f"response] pairs: {type(history).__name__})")
    messages = []
    for i, pair in enumerate(history, start=1):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, str) and x.strip() for x in pair)):
            raise RecordError(fields.history_field, f"bad history (item {i} is not a "
                                                    f"[prompt, response] pair of texts)")
        messages += [{"role": "user", "content": pair[0]},
                     {"role": "assistant", "content": pair[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages.append({"role": "user", "content": prompt})
    if prompt_only:
        return messages
    output = _text(values.get(fields.output_field), fields.output_field, "output",
                   required=False)
    if output is None:
        raise RecordError(fields.output_field, "missing output")
    if not output.strip():
        raise RecordError(fields.output_field, "empty response")
    return messages + [{"role": "assistant", "content": output}]


def _content(value, field: str, number: int) -> str:
    """A message's content: a string, or OpenAI-style parts [{"type": "text", "text"}]."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    if not isinstance(value, str):
        kind = "no content" if value is None else "content that is not text"
        raise RecordError(field, f"message {number} has {kind}")
    return value


def parse_turns(items, field: str = "messages", role_key: str = "role",
                content_key: str = "content", roles: dict[str, str] | None = None) -> list[dict]:
    """A chat (or, with ShareGPT keys and roles, ShareGPT) list as {role, content} messages;
    their order is checked by `check_order`."""
    roles = roles or {r: r for r in ROLES}
    if not isinstance(items, list):
        raise RecordError(field, f"{field} is not a list ({type(items).__name__})")
    messages = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict) or item.get(role_key) is None:
            raise RecordError(field, f"message {number} has no '{role_key}'")
        role = roles.get(str(item[role_key]).lower())
        if role is None:
            raise RecordError(field, f"unknown role '{item[role_key]}' (message {number}; "
                                     f"expected {', '.join(sorted(roles))})")
        messages.append({"role": role, "content": _content(item.get(content_key), field,
                                                           number)})
    return messages


def check_order(messages: list[dict], field: str | None = None,
                prompt_only: bool = False) -> list[dict]:
    """An optional system message first, then user/assistant alternating from a user turn to
    an assistant turn (to a user turn for `prompt_only`), none of them empty. An empty system
    message is dropped. Messages are numbered from 1 in the reasons."""
    skipped = 0
    if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
        messages, skipped = messages[1:], 1
    offset = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) == offset:
        raise RecordError(field, "no user turn" if prompt_only else "no assistant turn")
    for i, message in enumerate(messages[offset:], start=offset):
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        number = i + 1 + skipped
        if message["role"] != expected:
            after = f"after '{messages[i - 1]['role']}'" if i > offset else "first"
            raise RecordError(field, f"roles out of order (message {number} is "
                                     f"'{message['role']}' {after}; expected '{expected}')")
        if not message["content"].strip():
            what = "empty response" if expected == "assistant" else "empty prompt"
            raise RecordError(field, f"{what} (message {number})")
    last = messages[-1]["role"]
    if prompt_only and last != "user":
        raise RecordError(field, "roles out of order (the prompt must end with a user turn)")
    if not prompt_only and last != "assistant":
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError(field, "no assistant turn")
        raise RecordError(field, "roles out of order (ends with a user message: no response "
                                 "to learn)")
    return messages


def record_messages(values: dict, fields, prompt_only: bool = False) -> tuple[str, list[dict]]:
    """(style, messages) of one record; RecordError when it cannot be used.

    `fields` is the instruction task's settings: the `*_field` names and `system_prompt`
    (used when the record brings no system message of its own). `prompt_only`: the messages
    up to the last user turn, for generation (a reference response is left out).
    """
    if fields.messages_field in values or fields.conversations_field in values:
        chat = fields.messages_field in values
        style, field = ("chat", fields.messages_field) if chat else (
            "sharegpt", fields.conversations_field)
        messages = (parse_turns(values[field], field) if chat else
                    parse_turns(values[field], field, "from", "value", SHAREGPT_ROLES))
        if prompt_only and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the reference response
        messages = check_order(messages, field, prompt_only)
    elif fields.instruction_field in values or fields.output_field in values:
        style, messages = "alpaca", _alpaca(values, fields, prompt_only)
    else:
        raise RecordError(None, f"unknown layout (no '{fields.instruction_field}', "
                                f"'{fields.messages_field}' or '{fields.conversations_field}' "
                                f"field)")
    if messages[0]["role"] != "system":
        system = _text(values.get(fields.system_field), fields.system_field, "system",
                       required=False) or fields.system_prompt
        if system and system.strip():
            messages = [{"role": "system", "content": system}, *messages]
    return style, messages


# --------------------------------------------------------------------------------------------
# files


def _format(path: str, format: str) -> str:
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"instruction data must be one of {', '.join(FORMATS)}; got {fmt!r}"
                        f" (set data.format)", file=path)
    return fmt


def _by_record(path: str, fmt: str) -> bool:
    """Whether the readers number this file's rows by record rather than by line: parquet,
    and JSON documents (a JSON lines file named .json is read line by line)."""
    if fmt == "parquet":
        return True
    if fmt != "json":
        return False
    text = Path(path).read_text(encoding="utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        return True
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def read_file(path: str, fields, format: str = "auto",
              name: str | None = None) -> tuple[list[Conversation], list[Problem]]:
    """Conversations of one file and the records dropped from it (shown as `name`)."""
    name = name or path
    fmt = _format(path, format)
    rows = read_rows(path, fmt)
    by_record = _by_record(path, fmt)
    conversations, problems, keys, n_rows = [], [], Counter(), 0
    for row in rows:
        n_rows += 1
        keys.update(list(row.values))
        try:
            style, messages = record_messages(row.values, fields)
        except RecordError as e:
            problems.append(RecordProblem(name, row.line, e.field, e.reason, by_record))
            continue
        conversations.append(Conversation(messages, style, name, row.line, by_record))
    if n_rows == 0:
        raise DataError("file has no records", file=name)
    if not conversations:
        raise DataError(_no_records_message(problems, keys), file=name)
    return conversations, problems


def _no_records_message(problems: list[Problem], keys: Counter) -> str:
    kinds = Counter(p.kind() for p in problems).most_common(3)
    top = ", ".join(f"{n} {kind}" for kind, n in kinds)
    fields = ", ".join(k for k, _ in keys.most_common(12)) or "(none)"
    return (f"no usable records ({len(problems)} dropped: {top}; first: {problems[0].where()}: "
            f"{problems[0].reason}). The records' fields are: {fields}; the task.*_field "
            f"settings name the fields to read")


def load_instruction_data(cfg: DataConfig, fields) -> InstructionData:
    """Read, check and split the data described by `cfg` (files) and `fields` (the task's
    settings: field names and system prompt)."""
    if cfg.train is None:
        raise DataError("instruction tuning needs data.train (an Alpaca, chat or ShareGPT "
                        "JSON/JSONL file)")
    given = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    splits, problems, sources = {}, [], {}
    for split, path in given.items():
        if path is not None:
            splits[split], dropped = read_file(path, fields, cfg.format)
            problems += dropped
            sources[split] = path
    hold_out(splits, sources, cfg.train, cfg)
    if cfg.max_train_rows is not None and len(splits["train"]) > cfg.max_train_rows:
        total = len(splits["train"])
        splits["train"] = stratified_subsample(splits["train"], cfg.max_train_rows,
                                               cfg.split_seed)
        sources["train"] += (f"; {cfg.max_train_rows} of its {total} records "
                             f"(random sample, seed {cfg.split_seed})")
    ordered = {split: splits[split] for split in SPLITS if split in splits}
    return InstructionData(ordered, problems, {s: sources[s] for s in ordered})


def read_prompts(path: str, fields, format: str = "auto") -> tuple[list[dict], list[list[dict]]]:
    """Records to generate for (`tunelab predict`) and their prompts as message lists.

    A record's prompt is its conversation up to the last user turn: a reference response
    (Alpaca `output`, a final assistant message) is left out, so that the output can set it
    beside the generated text. No record is dropped: one that cannot be used is a DataError
    naming the file, the place and why.
    """
    fmt = _format(path, format)
    by_record = _by_record(path, fmt)
    rows, prompts = [], []
    for row in read_rows(path, fmt):
        try:
            _, messages = record_messages(row.values, fields, prompt_only=True)
        except RecordError as e:
            if by_record:
                raise DataError(f"record {row.line}: {e.reason}", file=path,
                                column=e.field) from None
            raise DataError(e.reason, file=path, line=row.line, column=e.field) from None
        rows.append(row.values)
        prompts.append(messages)
    if not rows:
        raise DataError("file has no records", file=path)
    return rows, prompts


# --------------------------------------------------------------------------------------------
# reports


def format_preflight(data: InstructionData, max_problems: int = 10) -> str:
    """Conversations and responses per split, where they came from, dropped records by why."""
    lines = ["Data: instruction tuning"]
    width = max(len(name) for name in data.splits)
    for name, conversations in data.splits.items():
        styles = Counter(c.style for c in conversations)
        kinds = ", ".join(f"{n} {style}" for style, n in styles.most_common())
        lines.append(f"  {name.ljust(width)}  {len(conversations)} conversations ({kinds}), "
                     f"{sum(_responses(c) for c in conversations)} responses; "
                     f"from {data.sources.get(name, '')}")
    lines += problem_lines(data.problems, "records", max_problems)
    return "\n".join(lines)
