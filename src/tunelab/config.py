"""Recipes as data: nested dataclasses <- YAML <- dotted command-line overrides.

Every field carries its documentation in the docstring under it (``tunelab train --help-config``
prints them). Unknown keys are errors that list the valid ones; values are type-checked; the
resolved config is saved in every run directory and can be fed back as a recipe.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
FORMATS = ("auto", "csv", "tsv", "json", "jsonl", "parquet", "labeltext", "conll", "text")
SCHEDULES = ("linear", "cosine", "constant")
TRACKERS = ("tensorboard", "mlflow", "wandb", "none")
MODEL_SIZES = ("tiny", "mini", "small")
ARCHITECTURES = ("bert", "roberta-prelayernorm", "llama")


@dataclass
class ModelConfig:
    name: str = "minilm"
    """Pretrained model: a packaged alias (minilm, mpnet, smollm2, gemma3-270m), a local
    directory (a Transformers model folder or a tunelab run directory), or a hub id."""
    max_length: int = 128
    """Longest input in tokens; longer inputs are truncated (the preflight counts them).
    Language modelling packs the corpus into blocks of exactly this many tokens."""
    size: str | None = None
    """Pretraining from scratch (tasks mlm, causal_lm): build a randomly initialised model of
    this size instead of loading `name`: tiny (2 layers, hidden 128, 2 heads), mini (4, 256,
    4) or small (4, 512, 8); BERT for mlm, Llama for causal_lm. docs/pretraining.md lists the
    parameter counts."""
    tokenizer: str | None = None
    """With `size`: wordpiece, bpe or char trains a new tokenizer on the training corpus (char:
    one token per character, for Chinese); a folder, alias or run directory reuses its
    tokenizer. Unset: wordpiece for mlm, bpe for causal_lm."""
    vocab_size: int = 8000
    """Vocabulary size of a tokenizer trained from the corpus (`tokenizer` wordpiece, bpe or
    char); a small corpus may yield fewer tokens."""
    architecture: str | None = None
    """With `size`: the model built. mlm: bert (post-LayerNorm, BERT's own; the default) or
    roberta-prelayernorm (LayerNorm before each sub-layer: trains faster from scratch and
    tolerates higher learning rates); causal_lm: llama. Both mlm choices fine-tune through the
    Auto classes like any Transformers model."""
    dropout: float | None = None
    """With `size`: dropout of the new model (hidden and attention). Unset: the architecture's
    default (0.1 for BERT). Short pretraining runs underfit, so 0.0 learns faster (Geiping &
    Goldstein 2023, "Cramming"); the value is stored in the run's model and kept by later
    fine-tuning."""

    def __post_init__(self):
        _check(self.max_length >= 8, "model.max_length must be at least 8")
        _check(self.size is None or self.size in MODEL_SIZES,
               f"model.size must be one of {', '.join(MODEL_SIZES)}; got {self.size!r}")
        _check(self.tokenizer is None or self.size is not None,
               "model.tokenizer applies only with model.size (a model built from scratch); "
               "a pretrained model keeps its own tokenizer")
        _check(self.architecture is None or self.architecture in ARCHITECTURES,
               f"model.architecture must be one of {', '.join(ARCHITECTURES)}; got "
               f"{self.architecture!r}")
        _check((self.architecture is None and self.dropout is None) or self.size is not None,
               "model.architecture and model.dropout apply only with model.size (a model built "
               "from scratch); a pretrained model keeps its own")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0,
               f"model.dropout must be in [0, 1); got {self.dropout}")
        _check(self.vocab_size >= 300, "model.vocab_size must be at least 300 (byte-level BPE "
               "alone needs 256 + special tokens)")


@dataclass
class DataConfig:
    train: str | None = None
    """Training file (csv, tsv, json, jsonl, parquet or 'LABEL text' .txt). When train,
    validation and test are all unset, the packaged English sentiment demo set is used."""
    validation: str | None = None
    """Validation file. Unset: `validation_ratio` of the training rows are held out."""
    test: str | None = None
    """Test file. Unset: `test_ratio` of the training rows are held out (0 = no test split)."""
    format: str = "auto"
    """File format: auto (from the extension and the task), csv, tsv, json, jsonl, parquet,
    labeltext ('LABEL text' lines), conll (token columns, blank line between sentences) or text
    (plain text corpus)."""
    text_column: str = "text"
    """Column holding the text."""
    text_pair_column: str | None = None
    """Column holding the second text of a pair (NLI, paraphrase); unset for single texts."""
    label_column: str = "label"
    """Column holding the label, as a name ("positive") or an integer id."""
    labels: list[str] | None = None
    """Label names in id order. Unset: inferred from the training data (sorted). When given,
    an integer label i in the data means labels[i]."""
    validation_ratio: float = 0.1
    """Share of training rows held out for validation when no validation file is given."""
    test_ratio: float = 0.0
    """Share of training rows held out for test when no test file is given."""
    split_seed: int = 42
    """Seed of the shuffle used for ratio splits."""
    max_train_rows: int | None = None
    """Use at most this many training rows (after splitting); unset = all."""

    def __post_init__(self):
        _check(0.0 <= self.validation_ratio < 1.0, "data.validation_ratio must be in [0, 1)")
        _check(0.0 <= self.test_ratio < 1.0, "data.test_ratio must be in [0, 1)")
        _check(self.validation_ratio + self.test_ratio < 1.0,
               "data.validation_ratio + data.test_ratio must be below 1")
        _check(self.format in FORMATS,
               f"data.format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        _check(self.max_train_rows is None or self.max_train_rows > 0,
               "data.max_train_rows must be positive")


@dataclass
class TrainConfig:
    epochs: float = 3.0
    """Passes over the training data (fractions allowed). Ignored when max_steps is set."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = 32
    """Examples per optimizer step, per process, before gradient accumulation."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; the loss equals the full-batch loss."""
    lr: float | None = None
    """Peak learning rate. Unset: the method's recommended rate (see `tunelab methods`)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    warmup_ratio: float = 0.06
    """Share of the optimizer steps spent warming the learning rate up from 0."""
    schedule: str = "linear"
    """Learning-rate decay after warm-up: linear, cosine or constant."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; unset = no clipping."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware has fast bf16, else fp32), bf16 or fp32."""
    attention: str = "auto"
    """Attention kernel while training: auto (eager on CPU, where PyTorch's fused SDPA backward
    is slower at these lengths: MiniLM trains 1.2-1.5x faster with eager; sdpa on GPUs), sdpa
    or eager. Prediction and serving always use the model's default (SDPA)."""
    fast_dropout: bool = True
    """On CPU, dropout masks from 16 random bits per element (tunelab.train.dropout): the same
    drop probability, 3x cheaper masks (MiniLM on 3,000 SST-2 rows, paired runs: full
    fine-tuning 1.00-1.16x faster, median 1.09x; LoRA 1.08-1.19x), a different random stream
    from torch's own dropout; false = torch's dropout. GPUs always use torch's."""
    keep_embedding_grads: bool = True
    """On CPU (one process), the gradient of each trainable embedding of 4,096+ rows is added
    row by row into a tensor kept across steps (tunelab.train.embedding_grads) instead of a
    fresh table-sized one each step: the same values, 11-13 ms less per MiniLM step, Gemma-3
    full fine-tuning 20% faster; the kept tensor stays resident (47 MB for MiniLM, 671 MB for
    Gemma-3, whose peak grew by 1.2 GB); false = torch's dense gradients."""
    keep_freed_memory: bool = True
    """On Linux (glibc), memory a step frees stays in the process for the next step instead of
    going back to the OS at each free (tunelab.train.memory): a MiniLM LoRA step faulted
    16,000-25,000 pages back in each time, 8-12% of its time. The resident size stays at the
    run's peak between steps and is given back when the run ends; process-wide for the rest of
    the process. false = malloc's own behaviour."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more time."""
    group_by_length: bool = True
    """Batch texts of similar length together (padding only to the longest in a batch)."""
    eval_every: int | None = None
    """Evaluate on the validation split every N optimizer steps; unset = once per epoch."""
    save_every: int | None = None
    """Write a resumable checkpoint every N optimizer steps; unset = at every evaluation."""
    metric: str | None = None
    """Validation metric that picks the best checkpoint and drives early stopping. Unset: the
    task's first metric (accuracy for classification, f1 for token classification, loss for
    language modelling)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement of `metric`; unset = never."""
    seed: int = 42
    """Seed for weights of new layers, dropout and data order."""
    log_every: int = 10
    """Write a line to metrics.jsonl (and the tracker) every N optimizer steps."""
    eval_batch_size: int = 64
    """Batch size for evaluation and prediction."""
    threads: int | None = None
    """Intra-op CPU threads; unset = one per available core."""
    tracker: str = "tensorboard"
    """Experiment tracker: tensorboard (RUN/tb), mlflow, wandb or none. W&B without an account:
    set WANDB_MODE=offline (the run is written under RUN/wandb; `wandb sync` uploads it)."""
    tracker_uri: str | None = None
    """MLflow tracking URI: a local store (file:./mlruns, sqlite:///mlflow.db) or a tracking
    server (http://host:5000). Unset: $MLFLOW_TRACKING_URI, else MLflow's default store in the
    working folder. Only for tracker mlflow."""

    def __post_init__(self):
        _check(self.epochs > 0, "train.epochs must be positive")
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps must be positive")
        _check(self.batch_size > 0, "train.batch_size must be positive")
        _check(self.grad_accum > 0, "train.grad_accum must be positive")
        _check(self.lr is None or self.lr > 0, "train.lr must be positive")
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)")
        _check(self.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}")
        _check(self.precision in PRECISIONS,
               f"train.precision must be one of {', '.join(PRECISIONS)}")
        _check(self.tracker in TRACKERS, f"train.tracker must be one of {', '.join(TRACKERS)}")
        _check(self.attention in ("auto", "sdpa", "eager"),
               f"train.attention must be auto, sdpa or eager; got {self.attention!r}")
        _check(self.tracker_uri is None or self.tracker == "mlflow",
               f"train.tracker_uri is MLflow's tracking URI: set train.tracker=mlflow with it "
               f"(train.tracker is {self.tracker})")
        _check(self.eval_every is None or self.eval_every > 0, "train.eval_every must be positive")
        _check(self.save_every is None or self.save_every > 0, "train.save_every must be positive")
        _check(self.log_every > 0, "train.log_every must be positive")


@dataclass
class MethodConfig:
    name: str = "full"
    """Adaptation method (see `tunelab methods`): full, freeze, lora, ..."""
    settings: Any = None
    """The method's own settings, written beside `name` in the recipe (method.r=16)."""

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self.settings)}


@dataclass
class TaskConfig:
    name: str = "classification"
    """What the model learns (see `tunelab tasks`): classification, token_classification, ..."""
    settings: Any = None
    """The task's own settings, written beside `name` (task.scheme=BIOES); `task: NAME` alone
    is short for `task: {name: NAME}`."""

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self.settings)}


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    """What the model learns and the task's settings."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Where the pretrained model comes from."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the data comes from and how its columns map."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """How the model is adapted."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation loop."""
    run_dir: str | None = None
    """Where the run is written. Unset: runs/<date>-<time>-<method>."""

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("model", "data", "train"):
            out[key] = dataclasses.asdict(out[key])
        out["method"] = self.method.to_dict()
        out["task"] = self.task.to_dict()
        return out

    def hash(self) -> str:
        """Stable hash of everything that changes the result (run_dir excluded)."""
        d = self.to_dict()
        d.pop("run_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------
# dict -> dataclasses


def build_with_method(cls, values: dict, where: str):
    """`build_dataclass` for a section with a `method:` of its own (setfit, prompt): the
    method given as a name or a dict of its settings."""
    values = dict(values)
    method = values.pop("method", None)
    if isinstance(method, str):
        method = {"name": method}
    settings = build_dataclass(cls, values, where)
    if method is not None:
        settings.method = build_method_config(method)
    return settings


def build_dataclass(cls, values: dict, where: str):
    """Build `cls` from a plain dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys"
                          f"{' under ' + where if where else ''}: {', '.join(names)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _coerce(value, hint, key):
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 3e-4 (no dot) as a string
        except ValueError:
            pass
    raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return " or ".join(_type_name(a) for a in args) + (" or null" if
                                                           type(None) in typing.get_args(hint)
                                                           else "")
    return getattr(hint, "__name__", str(hint))


# --------------------------------------------------------------------------------------------
# recipes and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003). Values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def merge_override(tree: dict, path: list[str], value) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if node is tree and part in ("task", "method") and isinstance(child, str):
            child = node[part] = {"name": child}  # `task: mlm` then task.whole_word_mask=true
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_recipe(path: str | Path | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {p} must be a mapping of sections (model, data, ...)")
    return tree


def resolve_config(recipe: str | Path | None = None, overrides: list[str] = (),
                   tree: dict | None = None) -> RunConfig:
    """Recipe file (or tree) + overrides -> validated RunConfig."""
    tree = dict(tree if tree is not None else load_recipe(recipe))
    tree = json.loads(json.dumps(tree))  # deep copy; also rejects non-plain values early
    for text in overrides:
        path, value = parse_override(text)
        merge_override(tree, path, value)
    method_tree = tree.pop("method", None) or {}
    task_tree = tree.pop("task", None) or {}
    config = build_dataclass(RunConfig, tree, "")
    config.method = build_method_config(method_tree)
    config.task = build_task_config(task_tree)
    return config


def build_task_config(values) -> TaskConfig:
    from tunelab.tasks import task_class

    if isinstance(values, str):
        values = {"name": values}
    if not isinstance(values, dict):
        raise ConfigError(f"task must be a task name or a mapping with a name, got {values!r}")
    values = dict(values)
    name = values.pop("name", "classification")
    cls = task_class(name)
    return TaskConfig(name=name, settings=build_dataclass(cls.settings_class, values, "task"))


def build_method_config(values: dict) -> MethodConfig:
    from tunelab.methods import registry  # the registry imports the method modules

    if not isinstance(values, dict):
        raise ConfigError(f"method must be a mapping with a name, got {values!r}")
    values = dict(values)
    name = values.pop("name", "full")
    spec = registry.get_method(name)
    settings = build_dataclass(spec.settings, values, "method")
    return MethodConfig(name=name, settings=settings)


def save_config(config: RunConfig, path: Path) -> None:
    from tunelab.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def describe_fields(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, for `--help-config` and the docs."""
    rows = []
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(describe_fields(hint, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, repr(default), docs.get(f.name, "")))
    return rows


def _field_docs(cls) -> dict[str, str]:
    """Read the docstring under each field from the source (the litgpt habit)."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
