"""Load a finished run and predict with it: the engine behind `eval`, `predict` and the API.

    >>> import tunelab
    >>> tunelab.load("runs/sst2-lora").predict(["a gripping, beautiful film"])
    [{'label': 'positive', 'score': 0.97, 'scores': {...}}]
"""
from __future__ import annotations

from pathlib import Path

import torch

from tunelab import runs
from tunelab.errors import TunelabError
from tunelab.methods import registry
from tunelab.tasks import classification as task
from tunelab.train.evaluate import evaluate, iter_logits, resolve_precision


class Predictor:
    def __init__(self, model, tokenizer, labels: list[str], max_length: int, bf16: bool,
                 batch_size: int = 64, config=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length
        self.bf16 = bf16
        self.batch_size = batch_size
        self.config = config
        self.device = next(model.parameters()).device
        self.run_dir: Path | None = None

    @classmethod
    def from_run(cls, run_dir, precision: str = "auto", batch_size: int = 64) -> "Predictor":
        """precision: auto (what the run trained with), bf16 or fp32."""
        run_dir = Path(run_dir)
        config, env, labels = runs.read_run(run_dir)
        model, tokenizer = load_run_model(run_dir, config, labels, env)
        chosen = env.get("precision", "fp32") if precision == "auto" else precision
        bf16 = resolve_precision(chosen, "cpu") == "bf16"
        predictor = cls(model, tokenizer, labels, config.model.max_length, bf16, batch_size, config)
        predictor.run_dir = run_dir
        return predictor

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> task.Encoded:
        return task.encode(self.tokenizer, list(texts), list(pairs) if pairs else None,
                           [0] * len(texts), self.max_length)

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
        """(N, C) fp32 logits in input order."""
        data = self.encode(texts, pairs)
        out = torch.empty(len(texts), len(self.labels))
        for idx, logits in iter_logits(self.model, data, self.batch_size,
                                       self.tokenizer.pad_token_id, self.device, self.bf16):
            out[idx] = logits
        return out

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap a single text in a list")
        if not texts:
            return []
        probs = self.logits(texts, pairs).softmax(-1)
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append({"label": self.labels[best], "score": float(row[best]),
                        "scores": {name: float(v) for name, v in zip(self.labels, row)}})
        return out

    def evaluate(self, examples) -> tuple[dict, torch.Tensor]:
        data = task.encode_examples(self.tokenizer, examples, self.max_length)
        return evaluate(self.model, data, len(self.labels), self.batch_size,
                        self.tokenizer.pad_token_id, self.device, self.bf16)


def load_run_model(run_dir: Path, config, labels: list[str], env: dict):
    """The trained model of a run: model/ as is, or the base + method + adapter/ weights."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = registry.get_method(config.method.name)
    if spec.saves == "model":
        folder = runs.existing_dir(run_dir / "model")
        if folder is None:
            raise TunelabError(f"{run_dir} has no model/ folder: did the run finish?")
        return (AutoModelForSequenceClassification.from_pretrained(folder),
                AutoTokenizer.from_pretrained(folder))
    if runs.existing_dir(run_dir / "adapter") is None:
        raise TunelabError(f"{run_dir} has no adapter/ folder: did the run finish?")
    built = task.build_model(config.model.name, labels, config.train.seed)
    ctx = registry.ApplyContext(config.task, built.head_modules, built.family,
                                env.get("total_steps"))
    model = registry.apply_method(built.model, config.method.name, config.method.settings, ctx)
    runs.load_state_dict_into(model, run_dir / "adapter")
    tokenizer_dir = runs.existing_dir(run_dir / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else built.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
