"""The "New training" form: the recipes in a folder, every field of a resolved recipe (value,
type, choices, the docstring under the field in config.py), and the overrides that turn the
form back into a `tunelab train` command line.

The form is a view of `resolve_config`: the server resolves, the page only shows and edits, so
a value the command line would refuse is refused here with the same message.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from tunelab import config as cfg
from tunelab.errors import ConfigError, TunelabError

SECTIONS = ("task", "model", "data", "method", "train")
"""The form's sections, in the order a recipe is read; run_dir is chosen by the dashboard."""
NAMED = ("task", "method")
"""Sections whose `name` picks a settings dataclass of its own."""


class FieldError(ConfigError):
    """A config error and the form field it names, so the page can mark the field."""

    def __init__(self, message: str, field: str | None):
        super().__init__(message)
        self.field = field


def list_recipes(folder: Path | None) -> list[dict]:
    """The packaged default, then every YAML file under `folder` with its first comment line.
    Files that are not recipes (search spaces, label files) are listed with the error that
    says why, so the page can show them disabled rather than hide them."""
    found = [{"path": "", "title": "defaults: minilm on the packaged English sentiment demo set",
              "error": None}]
    if folder is None:
        return found
    for path in sorted(folder.rglob("*.y*ml")):
        try:
            cfg.resolve_config(path)
            error = None
        except TunelabError as e:
            error = str(e)
        found.append({"path": path.relative_to(folder).as_posix(), "title": _title(path),
                      "error": error})
    return found


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def recipe_path(folder: Path | None, name: str) -> str | None:
    """A recipe named as list_recipes names it, as a path for the command line; names that
    leave the recipes folder are refused (the API must not read arbitrary files)."""
    if not name:
        return None
    if folder is None:
        raise ConfigError(f"recipe {name!r}: the dashboard has no recipes folder (--recipes)")
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()) or path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"recipe {name!r} is not a YAML file inside {folder}")
    if not path.is_file():
        raise ConfigError(f"recipe {name!r} does not exist in {folder}")
    return str(folder / name)


# --------------------------------------------------------------------------------------------
# fields


def choices() -> dict[str, list]:
    """Fields whose values come from a fixed list: shown as drop-downs."""
    from tunelab.methods.registry import all_methods
    from tunelab.tasks import task_names

    return {"task.name": task_names(), "method.name": [m.name for m in all_methods()],
            "model.size": [None, *cfg.MODEL_SIZES],
            "model.architecture": [None, *cfg.ARCHITECTURES], "data.format": list(cfg.FORMATS),
            "train.precision": list(cfg.PRECISIONS), "train.schedule": list(cfg.SCHEDULES),
            "train.tracker": list(cfg.TRACKERS), "train.attention": ["auto", "sdpa", "eager"]}


def form_fields(config: cfg.RunConfig) -> list[dict]:
    """One row per field of `config`: key, value, text (how the form shows and sends it),
    type, nullable, default, doc, choices. Method and task rows are those of the chosen
    method and task."""
    fixed = choices()
    rows = []
    for section in SECTIONS:
        part = getattr(config, section)
        if section in NAMED:
            rows += _rows(part, f"{section}.", only=("name",))
            part = part.settings
        rows += _rows(part, f"{section}.", skip=("name", "settings") if section in NAMED else ())
    for row in rows:
        row["choices"] = ([to_text(c) for c in fixed[row["key"]]] if row["key"] in fixed
                          else None)
    return rows


def _rows(obj, prefix: str, only=(), skip=()) -> list[dict]:
    cls = type(obj)
    docs = {key: doc for key, _, doc in cfg.describe_fields(cls, prefix)}
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if (only and f.name not in only) or f.name in skip:
            continue
        value = getattr(obj, f.name)
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
        kind, nullable = _kind(hints[f.name])
        rows.append({"key": prefix + f.name, "value": value, "text": to_text(value),
                     "type": kind, "nullable": nullable, "default": default,
                     "doc": docs.get(prefix + f.name, "")})
    return rows


def _kind(hint) -> tuple[str, bool]:
    """('int' | 'float' | 'str' | 'bool' | 'list', whether null is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        kind, _ = _kind(rest[0]) if len(rest) == 1 else ("str", False)
        return kind, type(None) in args
    if typing.get_origin(hint) is list:
        return "list", False
    return getattr(hint, "__name__", "str"), False


def to_text(value) -> str:
    """A value as an override writes it (`key=TEXT`, read back as YAML): null is empty, lists
    are JSON (valid YAML flow), booleans lower-case."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# --------------------------------------------------------------------------------------------
# form -> overrides


def overrides_from_form(recipe: str | None, values: dict[str, str]) -> list[str]:
    """The command-line overrides that give the form's `values` (key -> text, as shown).

    Only fields that differ from the recipe become overrides, so the command reads like one a
    person would type. A different task or method replaces its whole section first
    (`method={name: ia3}`), as the recipe's settings of the old one would be unknown keys of
    the new one; form values for settings the new one lacks are dropped with it."""
    if "run_dir" in values:
        raise ConfigError("run_dir is chosen by the dashboard (a new folder under the runs "
                          "folder); give the run a name instead")
    recipe_config = cfg.resolve_config(recipe)
    switched = [s for s in NAMED if f"{s}.name" in values
                and values[f"{s}.name"] != getattr(recipe_config, s).name]
    for section in switched:
        known = choices()[f"{section}.name"]
        if values[f"{section}.name"] not in known:
            raise ConfigError(f"{section}.name must be one of {', '.join(known)}; got "
                              f"{values[f'{section}.name']!r}")
    switches = [f"{s}={{name: {values[f'{s}.name']}}}" for s in switched]
    baseline = {r["key"]: r["text"] for r in form_fields(cfg.resolve_config(recipe, switches))}
    unknown = [k for k in values if k not in baseline and k.split(".")[0] not in switched]
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]}; valid fields: {', '.join(baseline)}")
    edits = [f"{k}={v}" for k, v in values.items() if k in baseline and v != baseline[k]]
    overrides = switches + edits
    cfg.resolve_config(recipe, overrides)  # the command line's own checks, same messages
    return overrides


def error_field(message: str, keys: list[str]) -> str | None:
    """The field a config error names, to mark it: the key the message names first (an
    unknown-key message goes on to list every valid key), the longest where keys overlap."""
    named = [k for k in keys if k in message]
    return min(named, key=lambda k: (message.index(k), -len(k))) if named else None


def check_data_files(config: cfg.RunConfig, cwd: Path) -> None:
    """Missing data files are refused before a child starts, naming the field: otherwise the
    child fails after a few seconds of imports with the same message in its log."""
    for split in ("train", "validation", "test"):
        value = getattr(config.data, split)
        if not value:
            continue
        parts = [value] if (cwd / value).exists() else [p.strip() for p in value.split(",")]
        missing = [p for p in parts if not (cwd / p).exists()]
        if missing:
            raise FieldError(f"data.{split}: {missing[0]} does not exist (relative paths are "
                             f"read from {cwd})", f"data.{split}")
