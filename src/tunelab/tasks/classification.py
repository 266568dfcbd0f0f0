"""Sequence classification of single texts or text pairs (sentiment, topic, NLI).

Holds what is specific to the task: building the model with a fresh head, turning examples
into token ids once (no padding), padding batches to their longest member, the loss and the
streaming metrics. The training loop and the predictor are task-agnostic around these.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.eval.metrics import METRICS, ConfusionMatrix, format_report, plot_confusion
from tunelab.tasks import register_task
from tunelab.tasks.base import BuiltModel, Task, TaskSettings, load_with_head


@dataclass
class Encoded:
    """Token ids of every example of one split, unpadded; lengths drive the batching."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    truncated: int

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, texts: list[str], pairs: list[str] | None, labels: list[int],
           max_length: int) -> Encoded:
    """Tokenise once with truncation; padding happens per batch in `collate`."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    ids = enc["input_ids"]
    types = enc.get("token_type_ids")
    truncated = sum(1 for x in ids if len(x) >= max_length)
    return Encoded(ids, types, list(labels), truncated)


def encode_examples(tokenizer, examples, max_length: int) -> Encoded:
    texts = [e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    return encode(tokenizer, texts, pairs, [e.label for e in examples], max_length)


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the chosen examples to the longest among them. Returns model inputs + labels."""
    width = max(len(data.input_ids[i]) for i in indices)
    n = len(indices)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((n, width), dtype=torch.long)
    types = torch.zeros((n, width), dtype=torch.long) if data.token_type_ids else None
    for row, i in enumerate(indices):
        ids = data.input_ids[i]
        input_ids[row, :len(ids)] = torch.tensor(ids)
        mask[row, :len(ids)] = 1
        if types is not None:
            types[row, :len(ids)] = torch.tensor(data.token_type_ids[i])
    batch = {"input_ids": input_ids, "attention_mask": mask,
             "labels": torch.tensor([data.labels[i] for i in indices], dtype=torch.long)}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


class ClassificationMetrics:
    """Accuracy, macro/weighted F1 and loss from a streaming confusion matrix."""

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.matrix = ConfusionMatrix(len(labels))

    @property
    def counts(self) -> torch.Tensor:
        return self.matrix.counts

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels, reduction="sum").item()
        self.matrix.update(logits.argmax(-1), labels, loss)

    def compute(self) -> dict[str, float]:
        return self.matrix.compute()

    def state(self) -> torch.Tensor:
        return torch.cat([self.matrix.counts.flatten().double(),
                          torch.tensor([self.matrix.loss_sum], dtype=torch.double)])

    def load_state(self, state: torch.Tensor) -> None:
        c = len(self.labels)
        self.matrix.counts = state[:c * c].round().long().view(c, c)
        self.matrix.loss_sum = float(state[-1])

    def report(self) -> str:
        return format_report(self.counts.numpy(), self.labels, self.compute())

    def save_artifacts(self, folder: Path, name: str, title: str) -> dict:
        """confusion_<name>.png; returns what goes beside the metrics in JSON."""
        plot_confusion(self.counts.numpy(), self.labels, Path(folder) / f"confusion_{name}.png",
                       title)
        return {"confusion": self.counts.tolist(), "labels": self.labels}


@dataclass
class ClassificationSettings(TaskSettings):
    """Classification needs no settings of its own: columns and labels live under `data:`."""


@register_task
class ClassificationTask(Task):
    name = "classification"
    summary = "one label per text or text pair (sentiment, topic, intent, NLI)"
    settings_class = ClassificationSettings
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    metrics = METRICS

    def load_data(self):
        from tunelab.data.classification import load_classification_data

        return load_classification_data(self.config.data)

    def format_preflight(self, data) -> str:
        from tunelab.data.classification import format_preflight

        return format_preflight(data)

    def build_model(self, labels: list[str]) -> BuiltModel:
        """Pretrained backbone + a freshly initialised classification head for `labels`."""
        from transformers import AutoModelForSequenceClassification

        return load_with_head(AutoModelForSequenceClassification, self.config.model.name,
                              self.config.train.seed, num_labels=len(labels),
                              id2label=dict(enumerate(labels)),
                              label2id={x: i for i, x in enumerate(labels)})

    def encode(self, tokenizer, examples) -> Encoded:
        return encode_examples(tokenizer, examples, self.config.model.max_length)

    def collate(self, data: Encoded, indices: list[int], pad_id: int) -> dict:
        return collate(data, indices, pad_id)

    def loss_sum(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed (not averaged) cross-entropy and the item count."""
        labels = batch["labels"]
        return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())

    def new_metrics(self, labels: list[str]) -> ClassificationMetrics:
        return ClassificationMetrics(labels)

    def load_predictor(self, run_dir, **kwargs):
        from tunelab.predict import Predictor

        return Predictor.from_run(run_dir, **kwargs)

    def show_example(self, tokenizer, data: Encoded, index: int) -> str:
        tokens = tokenizer.convert_ids_to_tokens(data.input_ids[index])
        return f"{len(tokens)} tokens, all read by the head:\n  " + " ".join(tokens)
