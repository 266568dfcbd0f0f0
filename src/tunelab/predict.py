"""Load a finished classification run and predict with it: the engine behind `eval`, `predict` and the API.

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
from tunelab.tasks import classification as cls_task
from tunelab.tasks import get_task
from tunelab.train.decoder_plan import plan_decoder_layers
from tunelab.train.evaluate import evaluate, iter_logits, resolve_precision
from tunelab.train.frozen import cache_frozen_casts, plan_frozen_linears
from tunelab.train.fused_lora import fuse_lora_layers, plan_lora_layers
from tunelab.train.layer_plan import plan_encoder_layers
from tunelab.train.mpnet_plan import plan_mpnet_layers


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
        self.task = get_task(config) if config is not None else None
        self.run_dir: Path | None = None

    @classmethod
    def from_run(cls, run_dir, precision: str = "auto", batch_size: int = 64,
                 merge: bool = True) -> "Predictor":
        """precision: auto (what the run trained with), bf16 or fp32. merge: fold a mergeable
        method (LoRA, AdaLoRA, IA3) into the base weights, as `tunelab export --to merged`
        does: in bf16 1.07x the sentences/s of the separate adapter and one short sentence
        in 5.3 against 9.7 ms; the same labels in fp32, 99.8% the same in bf16
        (docs/benchmarks.md). False keeps the model as it trained."""
        run_dir = Path(run_dir)
        config, env, labels = runs.read_run(run_dir)
        bf16 = run_uses_bf16(env, precision)
        model, tokenizer = load_run_model(run_dir, config, labels, env, merge, bf16)
        predictor = cls(model, tokenizer, labels, config.model.max_length, bf16, batch_size,
                        config)
        predictor.run_dir = run_dir
        return predictor

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> cls_task.Encoded:
        return cls_task.encode(self.tokenizer, list(texts), list(pairs) if pairs else None,
                           [0] * len(texts), self.max_length)

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
        """(N, C) fp32 logits in input order."""
        data = self.encode(texts, pairs)
        out = torch.empty(len(texts), len(self.labels))
        for idx, logits, _ in iter_logits(self._task(), self.model, data, self.batch_size,
                                          self.tokenizer.pad_token_id, self.device, self.bf16):
            out[idx] = logits
        return out

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap a single text in a list")
        if not texts:
            return []
        return as_predictions(self.logits(texts, pairs), self.labels)

    def evaluate(self, examples):
        """(metrics dict, the task's Metrics object: .report(), .save_artifacts())."""
        data = cls_task.encode_examples(self.tokenizer, examples, self.max_length)
        return evaluate(self._task(), self.model, data, self.labels, self.batch_size,
                        self.tokenizer.pad_token_id, self.device, self.bf16)

    def evaluate_file(self, path: str, format: str = "auto"):
        """(metrics, Metrics object, dropped rows) for a labelled file (`tunelab eval`)."""
        from tunelab.data.classification import load_labeled_file

        examples, problems = load_labeled_file(path, self.config.data, self.labels, format)
        metrics, tracker = self.evaluate(examples)
        return metrics, tracker, problems

    def predict_file(self, path: str, format: str = "auto", chunk: int = 2048) -> list[dict]:
        """Every input row with `predicted_label` and `score` added (`tunelab predict`)."""
        return predict_rows(self, path, self.config.data, format, chunk)

    def _task(self):
        if self.task is None:
            from tunelab.config import resolve_config

            self.task = get_task(resolve_config(overrides=["task=classification"]))
        return self.task


def as_predictions(logits: torch.Tensor, labels: list[str]) -> list[dict]:
    """(N, C) logits -> per text the best label, its probability and every label's."""
    return probabilities_as_predictions(logits.softmax(-1), labels)


def probabilities_as_predictions(probs, labels: list[str]) -> list[dict]:
    """(N, C) probabilities (a tensor or an array) -> what `tunelab.load(...).predict` returns:
    per text the best label, its probability and every label's."""
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": labels[best], "score": row[best], "scores": dict(zip(labels, row))})
    return out


def predict_rows(predictor, path: str, data, format: str = "auto",
                 chunk: int = 2048) -> list[dict]:
    """Every row of `path` with `predicted_label` and `score` added; `predictor` is anything
    with `predict(texts, pairs)` (a run's Predictor, an export's OnnxPredictor), `data` the
    DataConfig naming the text columns."""
    from tqdm.auto import tqdm

    from tunelab.data.classification import read_prediction_inputs

    rows, examples = read_prediction_inputs(path, data, format)
    out_rows = []
    with tqdm(total=len(examples), unit="text", desc="predict", mininterval=1.0) as bar:
        for start in range(0, len(examples), chunk):
            part = examples[start:start + chunk]
            pairs = ([e.text_pair or "" for e in part] if any(e.text_pair for e in part)
                     else None)
            preds = predictor.predict([e.text for e in part], pairs)
            for row, pred in zip(rows[start:start + chunk], preds):
                out_rows.append({**row.values, "predicted_label": pred["label"],
                                 "score": round(pred["score"], 6)})
            bar.update(len(part))
    return out_rows


def run_uses_bf16(env: dict, precision: str, device_type: str = "cpu") -> bool:
    """The precision rule of every way of loading a run: `auto` is what the run trained with,
    bf16 or fp32 as asked (bf16 only where the device does it fast)."""
    chosen = env.get("precision", "fp32") if precision == "auto" else precision
    return resolve_precision(chosen, device_type) == "bf16"


def load_run_model(run_dir: Path, config, labels: list[str], env: dict, merge: bool = False,
                   bf16: bool = False):
    """The trained model of a run: model/ as is, or the base + method + adapter/ weights
    (folded into the base weights with `merge` where the method can be), its weights frozen
    and prepared for prediction: under bf16 autocast with `bf16` (`keep_weights_cast`), else in
    fp32 (`keep_weights_fp32`)."""
    import transformers
    from transformers import AutoTokenizer

    spec = registry.get_method(config.method.name)
    task = get_task(config)
    if spec.saves == "model":
        folder = runs.existing_dir(run_dir / "model")
        if folder is None:
            raise TunelabError(f"{run_dir} has no model/ folder: did the run finish?")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = getattr(transformers, task.auto_class).from_pretrained(folder)
        return (keep_weights_cast(model) if bf16 else keep_weights_fp32(model)), tokenizer
    if runs.existing_dir(run_dir / "adapter") is None:
        raise TunelabError(f"{run_dir} has no adapter/ folder: did the run finish?")
    built = task.build_model(labels)
    ctx = registry.context_for(config, built, env.get("total_steps"))
    model = registry.apply_method(built.model, config.method.name, config.method.settings, ctx)
    runs.load_state_dict_into(model, run_dir / "adapter")
    if merge and spec.mergeable and spec.merge is not None:
        model = spec.merge(model)
    tokenizer_dir = runs.existing_dir(run_dir / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else built.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (keep_weights_cast(model) if bf16 else keep_weights_fp32(model)), tokenizer


def keep_weights_fp32(model):
    """`model` for prediction in fp32: its weights frozen, and a BERT-family encoder layer
    computed as one plain function (`layer_plan`) over its weights laid out for oneDNN's fp32
    matmul once, on x86 CPUs (`frozen.can_pack`): a merged MiniLM run, one short sentence
    8.6-9.0 -> 4.9-5.1 ms, 640 sentences 256-273 -> 293-303 sentences/s (three paired rounds),
    logits within 2e-6 of torch's own matmul, the same labels. Costs the linear layers'
    weights once more in fp32. This is `auto`'s path on CPUs without fast bf16."""
    model.requires_grad_(False)
    fuse_lora_layers(model)  # a LoRA run served alone folds its adapter (`fold_lora_layers`)
    plan_encoder_layers(model)
    plan_mpnet_layers(model)
    return model


def keep_weights_cast(model):
    """`model` for prediction under bf16 autocast: its weights frozen, so that each linear
    layer keeps its bf16 cast, on CPU laid out for oneDNN (`train.frozen`), instead of autocast
    making it again at every batch: MiniLM predicted 3-12% more sentences/s, the same logits,
    SmolLM2 generated 1.65-1.93x the tokens/s, the same text (bench/packed_weights.py; at one
    token a step the per-call re-layout and the cast of the 49k-row output layer dominate). Costs
    the weights' size in bf16 once. LoRA layers kept apart from the base (`merge=False`, `tunelab
    serve`) compute in their fused form (`train.fused_lora`), not PEFT's three matmuls and two
    passes: a MiniLM run unmerged, 363 -> 413 sentences/s, one sentence 13.3 -> 10.6 ms, with
    what each layer needs prepared once (`fused_lora.LoraPlan`: a short sentence 11.8 -> 10 ms).
    A BERT-family encoder layer computes as one plain function (`layer_plan`: a short sentence
    through a merged MiniLM 6.0-6.7 -> 4.5-5.0 ms, the same logits), and so do an MPNet layer
    (`mpnet_plan`) and a Llama-family decoder layer (`decoder_plan`: SmolLM2 generated 1.2x the
    tokens/s, the same text)."""
    model.requires_grad_(False)
    cache_frozen_casts(model)
    fuse_lora_layers(model)
    plan_frozen_linears(model)
    plan_lora_layers(model)
    plan_encoder_layers(model)
    plan_mpnet_layers(model)
    plan_decoder_layers(model)
    return model
