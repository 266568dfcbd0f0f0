"""Sequence classification of single texts or text pairs (sentiment, topic, NLI).

Holds what is specific to the task: building the model with a fresh head, turning examples
into token ids once (no padding), padding batches to their longest member, the loss and the
streaming metrics. The training loop and the predictor are task-agnostic around these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.eval.metrics import ConfusionMatrix


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


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed (not averaged) cross-entropy and the item count, so that gradient accumulation
    and multi-process training can divide by the true number of items in the optimizer step."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())


def new_metrics(num_labels: int) -> ConfusionMatrix:
    return ConfusionMatrix(num_labels)


def update_metrics(metrics: ConfusionMatrix, logits: torch.Tensor, labels: torch.Tensor) -> None:
    loss = F.cross_entropy(logits.float(), labels, reduction="sum").item()
    metrics.update(logits.argmax(-1), labels, loss)


# --------------------------------------------------------------------------------------------
# the model


@dataclass
class BuiltModel:
    model: torch.nn.Module
    tokenizer: object
    head_modules: list[str]
    family: str
    source: str


def build_model(name: str, labels: list[str], seed: int) -> BuiltModel:
    """Pretrained backbone + a freshly initialised classification head for `labels`."""
    from transformers import AutoModelForSequenceClassification

    from tunelab import models

    path = models.resolve_model(name)
    tokenizer = models.load_tokenizer(path)
    config = models.load_config(path, num_labels=len(labels),
                                id2label=dict(enumerate(labels)),
                                label2id={x: i for i, x in enumerate(labels)})
    if tokenizer.pad_token_id is None:  # decoders such as Llama ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)  # the head's initial weights depend on it
    model, info = models.load_pretrained(AutoModelForSequenceClassification, path, config=config,
                                         output_loading_info=True, ignore_mismatched_sizes=True)
    new_keys = list(info.get("missing_keys", [])) + [k[0] if isinstance(k, tuple) else k
                                                     for k in info.get("mismatched_keys", [])]
    return BuiltModel(model, tokenizer, head_modules_from_keys(new_keys),
                      models.model_family(config), path)


def head_modules_from_keys(keys) -> list[str]:
    """Module names owning newly initialised parameters ('classifier.weight' -> 'classifier')."""
    mods = sorted({k.rsplit(".", 1)[0] for k in keys if "." in k})
    # keep the outermost: 'classifier' covers 'classifier.dense'
    return [m for m in mods if not any(m.startswith(o + ".") for o in mods if o != m)]
