"""The space file of `tunelab search`: config keys mapped to distributions (float, int,
categorical; docs/experiments.md), parsed into Params that draw their value from an Optuna
trial. Errors name the file, the line's key and what was expected."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError

PARAM_TYPES = ("float", "int", "categorical")


@dataclass
class Param:
    key: str
    """Dotted config key, also the Optuna parameter name."""
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    where: str = ""
    """file:line of the key, for errors."""

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def example(self) -> Any:
        """A value from the space, to check the key against the config before any trial."""
        if self.type == "categorical":
            return self.choices[0]
        return int(self.low) if self.type == "int" else self.low


def load_space(path: str | Path) -> list[Param]:
    """Read and check a space file; `method.name` comes first (the other keys may depend on
    the method drawn)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        tree = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"space file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{path}: a space file maps config keys to distributions, e.g. "
                          f"'train.lr: {{type: float, low: 1e-5, high: 1e-3, log: true}}'")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    params = [parse_param(str(key), spec, f"{path}:{lines.get(key, 1)}")
              for key, spec in tree.items()]
    return sorted(params, key=lambda p: p.key != "method.name")


def parse_param(key: str, spec, where: str) -> Param:
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {key} must be a mapping like {{type: float, low: .., "
                          f"high: ..}} or a list of choices; got {spec!r}")
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}: {key}: type must be one of {', '.join(PARAM_TYPES)}; "
                          f"got {kind!r}")
    valid = ("choices",) if kind == "categorical" else ("low", "high", "log", "step")
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: {key}: unknown field {unknown[0]!r} for type {kind}; "
                          f"valid: {', '.join(valid)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: {key}: choices must be a non-empty list")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ConfigError(f"{where}: {key}: choices must be numbers, strings, booleans or "
                              f"null (Optuna stores them); got {choices!r}")
        return Param(key, kind, choices=choices, where=where)
    low, high, step = (_number(spec.get(f), f"{where}: {key}.{f}", kind)
                       for f in ("low", "high", "step"))
    log = spec.get("log", False)
    if low is None or high is None:
        raise ConfigError(f"{where}: {key}: type {kind} needs low and high")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {key}.log must be true or false; got {log!r}")
    if low >= high:
        raise ConfigError(f"{where}: {key}: low ({low}) must be below high ({high})")
    if log and (low <= 0 or step is not None):
        raise ConfigError(f"{where}: {key}: log needs low > 0 and no step")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: {key}.step must be positive")
    return Param(key, kind, low=low, high=high, log=log, step=step, where=where)


def _number(value, where: str, kind: str) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number; got {value!r}")
    if kind == "int":
        if value != int(value):
            raise ConfigError(f"{where} must be a whole number for type int; got {value!r}")
        return int(value)
    return float(value)
