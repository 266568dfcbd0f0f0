"""Few-shot learning: a k-per-class sampler and SetFit.

SetFit (Tunstall et al. 2022, "Efficient Few-Shot Learning Without Prompts", arXiv 2209.11055)
fine-tunes a sentence encoder contrastively on pairs built from the few labelled examples
(same label -> cosine target 1, different labels -> 0; the CosineSimilarityLoss of
sentence-transformers), then fits a logistic-regression head on the tuned embeddings. From 8
examples per class it reaches accuracies that plain fine-tuning needs hundreds for.

Written here instead of using the `setfit` package: that package pulls in sentence-transformers
and datasets (and pins their versions), while the method is a pair generator, a 20-line
training loop and scikit-learn's LogisticRegression. Written on tunelab's own parts it also
takes any encoder tunelab resolves (aliases, folders, run directories), any PEFT method of the
registry (`method.name=lora` trains a LoRA adapter instead of the whole encoder), and saves to
safetensors + JSON rather than pickle.

Trains: the encoder (or the method's parameters), then the head. Saves: `setfit.json` (labels,
settings, base model), `encoder/` (full) or `adapter.safetensors` (other methods), and
`head.safetensors` (the head's weights).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tunelab.config import MethodConfig
from tunelab.data.classification import Example
from tunelab.errors import ConfigError, DataError
from tunelab.train.frozen import cache_frozen_casts
from tunelab.train.fused_lora import fuse_lora_layers
from tunelab.train.grouped import group_projections

FULL_LR = 2e-5
"""SetFit's learning rate for the whole encoder (the paper's and sentence-transformers')."""


def sample_k_per_class(examples: list[Example], k: int, seed: int,
                       labels: list[str] | None = None) -> list[Example]:
    """k examples of every class, drawn without replacement; deterministic for a seed, file
    order kept. Every class present (every id of `labels` when given) needs k examples."""
    if k <= 0:
        raise ConfigError(f"k must be positive, got {k}")
    by_class: dict[int, list[int]] = {}
    for i, example in enumerate(examples):
        by_class.setdefault(example.label, []).append(i)
    ids = range(len(labels)) if labels is not None else sorted(by_class)
    rng = random.Random(seed)
    chosen = []
    for label in ids:
        pool = by_class.get(label, [])
        if len(pool) < k:
            name = labels[label] if labels is not None else label
            raise DataError(f"class {name!r} has {len(pool)} examples; {k} per class were "
                            "asked for")
        chosen += rng.sample(pool, k)
    return [examples[i] for i in sorted(chosen)]


def generate_pairs(labels: list[int], iterations: int, seed: int) -> list[tuple[int, int, float]]:
    """SetFit's pairs: each round pairs every example with one other example of its label
    (target 1.0) and one of another label (0.0), so 2 x iterations x N pairs, half positive."""
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    if len(by_label) < 2:
        raise DataError(f"SetFit needs examples of at least 2 classes, got {sorted(by_label)}")
    others = {y: [i for i, z in enumerate(labels) if z != y] for y in by_label}
    rng = random.Random(seed)
    pairs = []
    for _ in range(iterations):
        for i, y in enumerate(labels):
            same = [j for j in by_label[y] if j != i] or [i]  # a class of one pairs with itself
            pairs.append((i, rng.choice(same), 1.0))
            pairs.append((i, rng.choice(others[y]), 0.0))
    rng.shuffle(pairs)
    return pairs


def _default_method() -> MethodConfig:
    from tunelab.config import build_method_config

    return build_method_config({"name": "full"})


@dataclass
class SetFitSettings:
    num_iterations: int = 10
    """Pair-generation rounds R: training sees 2 x R x N pairs (N labelled examples), 20 x N by
    default (the paper uses R = 20; 10 is within a point on SST-2 at half the time)."""
    epochs: int = 1
    """Passes over the pairs."""
    batch_size: int = 16
    """Pairs per optimizer step."""
    lr: float | None = None
    """Peak learning rate. Unset: 2e-5 for the whole encoder (method full), else the method's
    own rate (see `tunelab methods`: 5e-4 for lora)."""
    warmup_ratio: float = 0.1
    """Share of steps warming the learning rate up linearly; it then decays linearly to 0."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm weights)."""
    max_length: int = 128
    """Longest input in tokens."""
    seed: int = 42
    """Seed of the pairs, their order, dropout and new method weights."""
    head_c: float = 1.0
    """Inverse regularisation strength of the logistic-regression head (scikit-learn's C)."""
    head_max_iter: int = 1000
    """Iterations of the head's solver (lbfgs)."""
    method: MethodConfig = field(default_factory=_default_method)
    """How the encoder is adapted: full, or a registered method (lora, bitfit, ...) with its
    settings (setfit.method.name=lora setfit.method.r=8)."""

    def __post_init__(self):
        for name in ("num_iterations", "epochs", "batch_size", "max_length", "head_max_iter"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"setfit.{name} must be positive")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("setfit.lr must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("setfit.warmup_ratio must be in [0, 1)")
        if self.head_c <= 0:
            raise ConfigError("setfit.head_c must be positive")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["method"] = self.method.to_dict()
        return out


def setfit_settings(values: dict) -> SetFitSettings:
    """From a plain dict (a recipe's `setfit:` section or setfit.* overrides)."""
    from tunelab.config import build_with_method

    return build_with_method(SetFitSettings, values, "setfit")


class SetFitClassifier:
    """fit(texts, label ids) -> predict_proba / predict; save(folder) and load(folder)."""

    def __init__(self, model: str, labels: list[str], settings: SetFitSettings | None = None):
        self.base_model, self.labels = str(model), list(labels)
        self.settings = settings or SetFitSettings()
        self.encoder, self.tokenizer = self._build_encoder()
        self.coef: np.ndarray | None = None  # (1 or C, H): the head, float64
        self.intercept: np.ndarray | None = None
        self.losses: list[float] = []

    def _build_encoder(self):
        from transformers import AutoModel

        from tunelab import models
        from tunelab.methods import registry

        tokenizer = models.load_tokenizer(self.base_model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        torch.manual_seed(self.settings.seed)  # new method weights (LoRA's A) depend on it
        encoder = models.load_pretrained(AutoModel, self.base_model)
        method = self.settings.method
        # "mlm" is the bare-encoder task: no classification head, PEFT's generic wrapper
        ctx = registry.ApplyContext("mlm", [], models.model_family(encoder.config))
        encoder = registry.apply_method(encoder, method.name, method.settings, ctx)
        cache_frozen_casts(encoder)
        fuse_lora_layers(encoder)
        group_projections(encoder)
        return encoder, tokenizer

    def fit(self, texts: list[str], labels: list[int]) -> "SetFitClassifier":
        if len(texts) != len(labels):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels")
        missing = sorted(set(range(len(self.labels))) - set(labels))
        if missing:
            raise DataError(f"SetFit needs examples of every label; none of "
                            f"{[self.labels[i] for i in missing]}")
        s = self.settings
        pairs = generate_pairs(labels, s.num_iterations, s.seed)
        self._train_body(list(texts), pairs)
        self._fit_head(self.embed(texts).numpy().astype(np.float64), np.asarray(labels))
        return self

    def _train_body(self, texts: list[str], pairs: list[tuple[int, int, float]]) -> None:
        """CosineSimilarityLoss: MSE between cos(u, v) and the pair's target."""
        from tunelab.methods import registry
        from tunelab.train.embedding_grads import EmbeddingGrads
        from tunelab.train.memory import keep_freed_memory, release_heap
        from tunelab.train.optim import build_optimizer, build_scheduler

        s = self.settings
        lr = s.lr or (FULL_LR if s.method.name == "full" else
                      registry.get_method(s.method.name).default_lr)
        ids = self.tokenizer(texts, truncation=True, max_length=s.max_length)["input_ids"]
        steps = s.epochs * math.ceil(len(pairs) / s.batch_size)
        optimizer = build_optimizer(self.encoder, lr, s.weight_decay)
        scheduler = build_scheduler(optimizer, "linear", steps, s.warmup_ratio)
        generator = torch.Generator().manual_seed(s.seed)
        torch.manual_seed(s.seed)  # dropout
        kept = EmbeddingGrads(self.encoder)  # full fine-tuning: the word embedding trains
        keep_freed_memory()  # as `tunelab train` does: no page faults at every step
        self.encoder.train()
        for _ in range(s.epochs):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            for start in range(0, len(order), s.batch_size):
                batch = [pairs[i] for i in order[start:start + s.batch_size]]
                used = sorted({i for a, b, _ in batch for i in (a, b)})  # embed each text once
                kept.attach()
                row = {i: r for r, i in enumerate(used)}
                vectors = self._embed_ids([ids[i] for i in used])  # (U, H)
                a = vectors[[row[a] for a, _, _ in batch]]
                b = vectors[[row[b] for _, b, _ in batch]]
                target = torch.tensor([t for _, _, t in batch], device=a.device)
                loss = torch.nn.functional.mse_loss((a * b).sum(-1), target)
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self.losses.append(loss.item())
        self.encoder.eval()
        release_heap()

    def _embed_ids(self, ids: list[list[int]]) -> torch.Tensor:
        from tunelab.zeroshot import embed_ids

        return embed_ids(self.encoder, ids, self.tokenizer.pad_token_id)

    def _fit_head(self, x: np.ndarray, y: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression

        head = LogisticRegression(C=self.settings.head_c, max_iter=self.settings.head_max_iter)
        head.fit(x, y)
        self.coef, self.intercept = head.coef_.astype(np.float64), head.intercept_.astype(
            np.float64)

    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(N, H) L2-normalised mean-pooled embeddings of the (tuned) encoder."""
        from tunelab.zeroshot import embed_texts

        return embed_texts(self.encoder, self.tokenizer, list(texts), batch_size,
                           self.settings.max_length)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N, C) probabilities, columns in `labels` order."""
        if self.coef is None:
            raise ConfigError("the SetFit classifier is not fitted: call fit() or load()")
        return head_probabilities(self.embed(texts).numpy().astype(np.float64), self.coef,
                                  self.intercept)

    def predict(self, texts: list[str]) -> list[dict]:
        """[{'label', 'score', 'scores'}] as tunelab.load(...).predict returns."""
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap a single text in a list")
        from tunelab.predict import probabilities_as_predictions

        return probabilities_as_predictions(self.predict_proba(texts), self.labels) if texts else []

    # -- saving -------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the classifier atomically: a crash never leaves half a folder behind."""
        from safetensors.numpy import save_file

        from tunelab.io import replace_dir, staging_dir
        from tunelab.methods import registry

        if self.coef is None:
            raise ConfigError("fit the SetFit classifier before saving it")
        folder = Path(folder)
        tmp = staging_dir(folder)
        if self.settings.method.name == "full":
            self.encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "encoder")
        else:
            from safetensors.torch import save_file as save_torch

            state = {k: v.contiguous() for k, v in
                     registry.trainable_state_dict(self.encoder).items()}
            save_torch(state, str(tmp / "adapter.safetensors"))
        save_file({"coef": self.coef, "intercept": self.intercept}, str(tmp / "head.safetensors"))
        meta = {"kind": "setfit", "base_model": self.base_model, "labels": self.labels,
                "settings": self.settings.to_dict()}
        (tmp / "setfit.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        replace_dir(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "SetFitClassifier":
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta_path = folder / "setfit.json"
        if not meta_path.is_file():
            raise ConfigError(f"{folder} is not a saved SetFit classifier (no setfit.json)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        settings = setfit_settings(meta["settings"])
        encoder_dir = folder / "encoder"
        clf = cls(str(encoder_dir) if encoder_dir.is_dir() else meta["base_model"],
                  meta["labels"], settings)
        clf.base_model = meta["base_model"]
        if not encoder_dir.is_dir():
            from safetensors.torch import load_file as load_torch

            result = clf.encoder.load_state_dict(load_torch(str(folder / "adapter.safetensors")),
                                                 strict=False)
            if result.unexpected_keys:
                raise ConfigError(f"{folder}/adapter.safetensors does not fit "
                                  f"{meta['base_model']} with method {settings.method.name}")
        head = load_file(str(folder / "head.safetensors"))
        clf.coef, clf.intercept = head["coef"], head["intercept"]
        clf.encoder.eval()
        return clf


def head_probabilities(x: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """What LogisticRegression.predict_proba computes: a sigmoid for two classes (one row of
    coefficients), a softmax over the classes otherwise."""
    scores = x @ coef.T + intercept  # (N, 1) or (N, C)
    if coef.shape[0] == 1:
        p = 1.0 / (1.0 + np.exp(-scores[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    scores = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=1, keepdims=True)
