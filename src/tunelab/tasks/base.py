"""What every task provides, so that one training loop, one evaluator and one predictor serve
classification, token classification, language modelling and instruction tuning alike.

A task is a class registered by name (``@register_task``); the recipe's ``task:`` section names
it and holds its settings (``task: {name: token_classification, scheme: IOB2}``, or just
``task: classification``). The loop only ever calls the methods below:

    data = task.load_data()                          # splits of examples + preflight
    built = task.build_model(data.labels)            # backbone + (new) head, tokenizer
    enc = task.encode(built.tokenizer, data.splits["train"])   # token ids, unpadded
    batch = task.collate(enc, indices, pad_id)       # padded tensors incl. "labels"
    logits = task.train_logits(model, batch)          # training: model(**inputs).logits
    loss, items = task.loss_sum(logits, batch)       # summed over the items that count
    metrics = task.new_metrics(data.labels); metrics.update(logits, batch); metrics.compute()

The loss is a sum over "items" (examples, tagged words or predicted tokens) so that gradient
accumulation and multi-process training divide by the true item count of an optimizer step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch


@dataclass
class TaskSettings:
    """Base for every task's settings dataclass (the recipe's `task:` section)."""


@dataclass
class BuiltModel:
    model: torch.nn.Module
    tokenizer: object
    head_modules: list[str]
    """Dotted names of modules whose weights are new (the task head); they always train."""
    family: str
    """encoder (BERT-like), mpnet or decoder (Llama-like)."""
    source: str
    """The resolved model path."""


class Encoded(Protocol):
    """Token ids of one split, unpadded. Tasks define their own; the loop needs only these."""

    truncated: int

    @property
    def lengths(self) -> list[int]: ...

    def __len__(self) -> int: ...


class Metrics(Protocol):
    """Streaming metrics: batches are added one by one, nothing per example is kept that grows
    with the logits; `state`/`load_state` let processes sum their shares."""

    def update(self, logits: torch.Tensor, batch: dict) -> None: ...

    def compute(self) -> dict[str, float]: ...

    def state(self) -> torch.Tensor: ...

    def load_state(self, state: torch.Tensor) -> None: ...

    def report(self) -> str: ...

    def save_artifacts(self, folder: Path, name: str, title: str) -> dict: ...


class Task:
    """Base class; subclasses set the class attributes and implement the data/model/loss parts."""

    name: ClassVar[str]
    summary: ClassVar[str]
    settings_class: ClassVar[type] = TaskSettings
    auto_class: ClassVar[str]
    """The transformers Auto class a finished full-fine-tuning run is loaded with."""
    peft_task_type: ClassVar[str | None] = None
    """PEFT's TaskType for this task (SEQ_CLS, TOKEN_CLS, CAUSAL_LM) or None."""
    metrics: ClassVar[tuple[str, ...]]
    """Names `train.metric` may take; the first is the default."""
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss", "perplexity"})
    has_labels: ClassVar[bool] = True
    """Whether the task learns a fixed label set (written to label_map.json)."""

    builds_from_scratch: ClassVar[bool] = False
    """Whether `model.size` (a randomly initialised model) makes sense for the task."""

    def __init__(self, config):
        from tunelab.errors import ConfigError

        if config.model.size is not None and not self.builds_from_scratch:
            raise ConfigError(f"model.size builds an untrained model, which task {self.name} "
                              f"cannot start from: pretrain one first (tunelab pretrain, task "
                              f"mlm or causal_lm) and give its run directory as model.name")
        self.config = config
        self.settings = config.task.settings

    # -- data ---------------------------------------------------------------------------------
    def load_data(self):
        """An object with `.labels`, `.splits` (train/validation/test -> examples) and
        `.preflight()` (a JSON-able summary with dropped rows and why)."""
        raise NotImplementedError

    def format_preflight(self, data) -> str:
        raise NotImplementedError

    # -- model --------------------------------------------------------------------------------
    def build_model(self, labels: list[str]) -> BuiltModel:
        raise NotImplementedError

    def encode(self, tokenizer, examples) -> Encoded:
        raise NotImplementedError

    def collate(self, data, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in ("labels", "word_ids")}

    def train_logits(self, model, batch: dict) -> torch.Tensor:
        """The logits a training step's loss is computed from (what `loss_sum` receives)."""
        return model(**self.model_inputs(batch)).logits

    def loss_sum(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def count_items(self, batch: dict) -> int:
        """How many items of `batch` count in the loss (labels that are not -100). Tasks that
        predict the next token store labels already shifted, so this stays true for them."""
        return int((batch["labels"] != -100).sum())

    def count_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def new_metrics(self, labels: list[str]) -> Metrics:
        raise NotImplementedError

    def load_predictor(self, run_dir, **kwargs):
        """The object `tunelab.load(run_dir)` returns for a finished run of this task."""
        raise NotImplementedError(f"task {self.name} has no predictor")

    # -- people -------------------------------------------------------------------------------
    def show_example(self, tokenizer, data, index: int) -> str:
        """One encoded example rendered as tokens, marking those that count in the loss."""
        raise NotImplementedError

    @property
    def metric(self) -> str:
        """The validation metric that picks the best checkpoint."""
        return self.config.train.metric or self.metrics[0]


def settings_dict(settings) -> dict:
    return dataclasses.asdict(settings) if settings is not None else {}


def head_modules_from_keys(keys) -> list[str]:
    """Module names owning newly initialised parameters ('classifier.weight' -> 'classifier')."""
    mods = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    # keep the outermost: 'classifier' covers 'classifier.dense'
    return [m for m in mods if not any(m.startswith(o + ".") for o in mods if o != m)]


def load_with_head(auto_class, name: str, seed: int, **config_kwargs) -> BuiltModel:
    """Pretrained backbone from `name` (alias, folder, run dir or hub id) + a freshly
    initialised head of `auto_class`; new weights are seeded, the pad token always set."""
    from tunelab import models

    path = models.resolve_model(name)
    tokenizer = models.load_tokenizer(path)
    config = models.load_config(path, **config_kwargs)
    if tokenizer.pad_token_id is None:  # decoders such as Llama ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)  # the head's initial weights depend on it
    model, info = models.load_pretrained(auto_class, path, config=config,
                                         output_loading_info=True, ignore_mismatched_sizes=True)
    new_keys = list(info.get("missing_keys", [])) + [k[0] if isinstance(k, tuple) else k
                                                     for k in info.get("mismatched_keys", [])]
    heads = untied_head_modules(model, head_modules_from_keys(new_keys))
    return BuiltModel(model, tokenizer, heads, models.model_family(config), path)


def untied_head_modules(model: torch.nn.Module, heads: list[str]) -> list[str]:
    """Split head modules around weights tied to the backbone. A new masked-LM head (MiniLM
    ships without one) ties its output projection to the input embeddings: training that
    "head" would train the whole vocabulary matrix, so PEFT methods keep only its untied parts
    (cls.predictions.transform) as the head; `full` still trains everything."""
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), set()).add(name)
    modules = dict(model.named_modules())

    def tied(name: str) -> bool:
        for _, p in modules[name].named_parameters(prefix=name):
            if any(not (other == name or other.startswith(name + "."))
                   for other in shared[id(p)]):
                return True
        return False

    out = []
    for head in heads:
        pending = [head]
        while pending:
            name = pending.pop(0)
            if not tied(name):
                out.append(name)
            else:
                pending += [f"{name}.{child}" for child, _ in modules[name].named_children()]
    return out
