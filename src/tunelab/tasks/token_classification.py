"""Token classification: a tag per word (named entities, chunks), scored on entity spans.

Words are split into sub-word tokens by a fast tokenizer (`is_split_into_words=True`); the
first sub-token of each word carries the word's tag in the loss, the others are ignored (or
learn the I- tag with `label_all_subwords`). Metrics are computed on words, not tokens: each
word takes the prediction of its first sub-token, and words cut off by `model.max_length`
count as predicted O, so recall pays for truncation. Entities follow conlleval's reading of a
tag sequence (seqeval's `get_entities`); F1 is the micro average over entity types.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.data.tag_schemes import SCHEMES
from tunelab.errors import ConfigError, ModelError
from tunelab.tasks import register_task
from tunelab.tasks.base import BuiltModel, Task, TaskSettings, load_with_head

EXTRA_KEYS = ("labels", "word_ids", "gold_tags")
"""Batch entries that are not model inputs: the loss targets and what the metrics need."""


@dataclass
class TokenClassificationSettings(TaskSettings):
    scheme: str = "auto"
    """Tagging scheme of the files: auto (guessed from the training file), IOB1 (converted to
    IOB2 on reading), IOB2 (BIO) or BIOES (IOBES; BILOU's U-/L- are read as S-/E-)."""
    tag_column: int | None = None
    """CoNLL files: index of the column holding the tags (0 = the tokens). Unset: the last
    column whose values look like tags (O, B-X, I-X ...)."""
    tokens_field: str = "tokens"
    """json/jsonl/parquet/csv/tsv rows: field holding the tokens (a list, or a string split on
    spaces)."""
    tags_field: str = "tags"
    """json/jsonl/parquet/csv/tsv rows: field holding the tags (names, or integer ids into
    data.labels)."""
    label_all_subwords: bool = False
    """Also train the inner sub-tokens of a word (on the word's I- tag). Predictions and
    metrics always read a word's first sub-token."""

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ConfigError(f"task.scheme must be one of {', '.join(SCHEMES)}; "
                              f"got {self.scheme!r}")
        if self.tag_column is not None and self.tag_column < 1:
            raise ConfigError("task.tag_column must be at least 1 (column 0 holds the tokens)")


# --------------------------------------------------------------------------------------------
# encoding


@dataclass
class Encoded:
    """Token ids of every sentence of one split, unpadded, with the word alignment."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[list[int]]
    """Per token: the tag id it learns, or -100 (special tokens, inner sub-tokens)."""
    word_ids: list[list[int]]
    """Per token: the index of its word, -1 for special tokens."""
    gold: list[list[int]]
    """Per sentence: the tag id of every word, truncated words included (empty: unlabelled)."""
    tag_names: list[str]
    truncated: int
    """Sentences that lose words to max_length."""
    truncated_entities: int
    """Gold entities with at least one word cut off."""

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)


def inner_tags(labels: list[str]) -> list[int]:
    """Tag id -> the id inner sub-tokens learn: I-X for any X tag when I-X exists, else itself."""
    index = {t: i for i, t in enumerate(labels)}
    return [index.get(f"I-{t[2:]}", i) if t != "O" else i for i, t in enumerate(labels)]


def encode_sentences(tokenizer, sentences, labels: list[str], max_length: int,
                     label_all_subwords: bool = False) -> Encoded:
    """Tokenise once with truncation and align tags to sub-tokens; padding is per batch."""
    from seqeval.metrics.sequence_labeling import get_entities

    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"token classification needs a fast (Rust) tokenizer to align words "
                         f"and sub-tokens; {type(tokenizer).__name__} is not one")
    index = {t: i for i, t in enumerate(labels)}
    inner = inner_tags(labels) if label_all_subwords else None
    enc = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True,
                    max_length=max_length, padding=False)
    out = Encoded(enc["input_ids"], enc.get("token_type_ids"), [], [], [], list(labels), 0, 0)
    for i, sentence in enumerate(sentences):
        word_ids = [-1 if w is None else w for w in enc.word_ids(i)]
        gold = [index[t] for t in sentence.tags]
        targets, prev = [], -1
        for w in word_ids:
            if w < 0 or not gold:
                targets.append(-100)
            elif w != prev:
                targets.append(gold[w])
            else:
                targets.append(inner[gold[w]] if inner else -100)
            prev = w
        kept = max(word_ids, default=-1) + 1
        if kept < len(sentence.words) and len(word_ids) >= max_length:
            out.truncated += 1
            out.truncated_entities += sum(end >= kept for _, _, end in get_entities(sentence.tags))
        out.labels.append(targets)
        out.word_ids.append(word_ids)
        out.gold.append(gold)
    return out


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the chosen sentences to the longest among them: model inputs, token labels,
    word ids (-1 = no word) and the gold tags of every word (-100 = padding)."""
    width = max(len(data.input_ids[i]) for i in indices)
    words = max(len(data.gold[i]) for i in indices)
    n = len(indices)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    word_ids = torch.full((n, width), -1, dtype=torch.long)
    gold = torch.full((n, words), -100, dtype=torch.long)  # (B, W)
    types = torch.zeros((n, width), dtype=torch.long) if data.token_type_ids else None
    for row, i in enumerate(indices):
        length = len(data.input_ids[i])
        input_ids[row, :length] = torch.tensor(data.input_ids[i])
        mask[row, :length] = 1
        labels[row, :length] = torch.tensor(data.labels[i])
        word_ids[row, :length] = torch.tensor(data.word_ids[i])
        gold[row, :len(data.gold[i])] = torch.tensor(data.gold[i], dtype=torch.long)
        if types is not None:
            types[row, :length] = torch.tensor(data.token_type_ids[i])
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
             "word_ids": word_ids, "gold_tags": gold}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def first_subtokens(word_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the tokens that start a word, the ones whose prediction a word takes."""
    first = word_ids >= 0
    first[:, 1:] &= word_ids[:, 1:] != word_ids[:, :-1]
    return first


def word_tags(token_preds: torch.Tensor, word_ids: torch.Tensor, first: torch.Tensor,
              n_words: int, fill: int) -> torch.Tensor:
    """(W,) one value per word from its first sub-token; words without one get `fill`."""
    out = torch.full((n_words,), fill, dtype=token_preds.dtype)
    out[word_ids[first]] = token_preds[first]
    return out


# --------------------------------------------------------------------------------------------
# metrics


class TaggingMetrics:
    """Entity-level precision/recall/F1 per type from streaming TP/FP/FN counts, plus word
    accuracy and loss. Nothing per sentence is kept, so memory stays flat on any split."""

    def __init__(self, labels: list[str]):
        from tunelab.data.tag_schemes import entity_types

        self.labels = list(labels)
        self.types = entity_types(labels)
        self.type_index = {t: i for i, t in enumerate(self.types)}
        self.o_id = self.labels.index("O")
        self.counts = torch.zeros(3, len(self.types), dtype=torch.long)  # TP, FP, FN per type
        self.words = torch.zeros(2, dtype=torch.long)  # words right, words
        self.loss_sum, self.loss_items, self.sentences = 0.0, 0, 0

    def update(self, logits: torch.Tensor, batch: dict) -> None:
        labels = batch["labels"]
        self.loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                         ignore_index=-100, reduction="sum").item()
        self.loss_items += int((labels != -100).sum())
        preds = logits.argmax(-1)  # (B, T)
        first = first_subtokens(batch["word_ids"])
        for row in range(preds.shape[0]):
            gold = batch["gold_tags"][row]
            gold = gold[gold != -100]
            pred = word_tags(preds[row], batch["word_ids"][row], first[row], len(gold),
                             self.o_id)
            self.add([self.labels[i] for i in gold.tolist()],
                     [self.labels[i] for i in pred.tolist()])

    def add(self, gold: list[str], pred: list[str]) -> None:
        """Count one sentence's gold and predicted tags (conlleval entity semantics)."""
        from seqeval.metrics.sequence_labeling import get_entities

        true_set, pred_set = set(get_entities(gold)), set(get_entities(pred))
        for kind, _, _ in true_set & pred_set:
            self.counts[0, self.type_index[kind]] += 1
        for kind, _, _ in pred_set - true_set:
            self.counts[1, self.type_index[kind]] += 1
        for kind, _, _ in true_set - pred_set:
            self.counts[2, self.type_index[kind]] += 1
        self.words[0] += sum(g == p for g, p in zip(gold, pred))
        self.words[1] += len(gold)
        self.sentences += 1

    def per_type(self) -> dict[str, dict]:
        out = {}
        for i, kind in enumerate(self.types):
            tp, fp, fn = (int(x) for x in self.counts[:, i])
            out[kind] = {**_prf(tp, fp, fn), "support": tp + fn, "predicted": tp + fp}
        return out

    def compute(self) -> dict[str, float]:
        tp, fp, fn = (int(x) for x in self.counts.sum(1))
        per_type = self.per_type()
        seen = [v for v in per_type.values() if v["support"] or v["predicted"]]
        macro = {k: sum(v[k] for v in seen) / len(seen) if seen else 0.0
                 for k in ("precision", "recall", "f1")}
        right, words = (int(x) for x in self.words)
        return {**_prf(tp, fp, fn),
                "token_accuracy": right / words if words else 0.0,
                "loss": self.loss_sum / self.loss_items if self.loss_items else 0.0,
                "macro_f1": macro["f1"], "macro_precision": macro["precision"],
                "macro_recall": macro["recall"], "entities": tp + fn,
                "predicted_entities": tp + fp, "sentences": self.sentences,
                **{f"f1_{kind}": v["f1"] for kind, v in per_type.items()}}

    def state(self) -> torch.Tensor:
        return torch.cat([self.counts.flatten().double(), self.words.double(),
                          torch.tensor([self.loss_sum, self.loss_items, self.sentences],
                                       dtype=torch.double)])

    def load_state(self, state: torch.Tensor) -> None:
        k = len(self.types)
        self.counts = state[:3 * k].round().long().view(3, k)
        self.words = state[3 * k:3 * k + 2].round().long()
        self.loss_sum = float(state[-3])
        self.loss_items, self.sentences = int(state[-2].round()), int(state[-1].round())

    def report(self) -> str:
        m = self.compute()
        width = max([10] + [len(t) + 2 for t in self.types])
        lines = [f"entity F1 {m['f1']:.4f}    precision {m['precision']:.4f}    recall "
                 f"{m['recall']:.4f}    token accuracy {m['token_accuracy']:.4f}    "
                 f"{m['entities']} entities in {m['sentences']} sentences", "",
                 f"{'type':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
        for kind, v in self.per_type().items():
            lines.append(f"{kind:<{width}}{v['precision']:>10.4f}{v['recall']:>10.4f}"
                         f"{v['f1']:>10.4f}{v['support']:>10d}")
        lines.append("")
        for name, prefix in (("micro avg", ""), ("macro avg", "macro_")):
            lines.append(f"{name:<{width}}{m[prefix + 'precision']:>10.4f}"
                         f"{m[prefix + 'recall']:>10.4f}{m[prefix + 'f1']:>10.4f}"
                         f"{m['entities']:>10d}")
        return "\n".join(lines)

    def save_artifacts(self, folder: Path, name: str, title: str) -> dict:
        """Nothing is written (the table is small); returns the per-type figures for JSON."""
        return {"per_type": self.per_type(), "labels": self.labels}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# --------------------------------------------------------------------------------------------
# the task


@register_task
class TokenClassificationTask(Task):
    name = "token_classification"
    summary = "a tag per word: named entities and other spans (IOB1/IOB2/BIOES), entity F1"
    settings_class = TokenClassificationSettings
    auto_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    metrics = ("f1", "precision", "recall", "token_accuracy", "loss")

    def __init__(self, config):
        super().__init__(config)
        self.labels: list[str] | None = None
        """The tag list, known once `build_model` ran (encoding needs it)."""

    def load_data(self):
        """Read and check the files, and count what model.max_length cuts off (with the
        model's tokenizer, so the preflight tells before training)."""
        from tunelab import models
        from tunelab.data.tagging import load_tagging_data

        data = load_tagging_data(self.config.data, self.settings)
        tokenizer = models.load_tokenizer(self.config.model.name)
        data.max_length = self.config.model.max_length
        for split, sentences in data.splits.items():
            enc = self._encode(tokenizer, sentences, data.labels)
            data.truncation[split] = {"sentences": enc.truncated,
                                      "entities": enc.truncated_entities}
        return data

    def format_preflight(self, data) -> str:
        from tunelab.data.tagging import format_preflight

        return format_preflight(data)

    def build_model(self, labels: list[str]) -> BuiltModel:
        """Pretrained backbone + a freshly initialised token-classification head."""
        from transformers import AutoModelForTokenClassification

        self.labels = list(labels)
        return load_with_head(AutoModelForTokenClassification, self.config.model.name,
                              self.config.train.seed, num_labels=len(labels),
                              id2label=dict(enumerate(labels)),
                              label2id={x: i for i, x in enumerate(labels)})

    def _encode(self, tokenizer, sentences, labels: list[str]) -> Encoded:
        return encode_sentences(tokenizer, sentences, labels, self.config.model.max_length,
                                self.settings.label_all_subwords)

    def encode(self, tokenizer, examples) -> Encoded:
        if self.labels is None:
            raise RuntimeError("TokenClassificationTask.encode needs the tags: call "
                               "build_model(labels) first")
        return self._encode(tokenizer, examples, self.labels)

    def collate(self, data: Encoded, indices: list[int], pad_id: int) -> dict:
        return collate(data, indices, pad_id)

    def model_inputs(self, batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k not in EXTRA_KEYS}

    def loss_sum(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        """Cross-entropy summed over the sub-tokens that carry a tag, and their count."""
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                               ignore_index=-100, reduction="sum")
        return loss, int((labels != -100).sum())

    def new_metrics(self, labels: list[str]) -> TaggingMetrics:
        return TaggingMetrics(labels)

    def load_predictor(self, run_dir, **kwargs):
        from tunelab.predict_tagging import TaggingPredictor

        return TaggingPredictor.from_run(run_dir, **kwargs)

    def show_example(self, tokenizer, data: Encoded, index: int) -> str:
        tokens = tokenizer.convert_ids_to_tokens(data.input_ids[index])
        marked = [f"{tok}/{data.tag_names[t] if t != -100 else '-'}"
                  for tok, t in zip(tokens, data.labels[index])]
        return (f"{len(tokens)} tokens; the tag after '/' is what the token learns, '-' marks "
                f"tokens outside the loss:\n  " + " ".join(marked))
