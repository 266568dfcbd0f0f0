"""Predict with an export folder (`tunelab export --to onnx|int8`) instead of its run.

    >>> from tunelab import exported
    >>> exported.load("runs/sst2-lora/export/int8").predict(["a gripping, beautiful film"])
    [{'label': 'positive', 'score': 0.97, 'scores': {...}}]

An ONNX export runs on ONNX Runtime: no torch model, no PEFT, no tunelab run folder needed,
and on CPUs with VNNI/AMX-INT8 the int8 export answers a short sentence several times faster
than the torch model. `OnnxPredictor` has the Predictor's interface (`logits`, `predict`,
`predict_file`, `labels`), so `tunelab predict`, `tunelab serve` and `tunelab verify` run an
export through this one engine and give identical outputs for it. Batches are formed as the
torch engine forms them: texts tokenised once, sorted by length, padded to the longest in
their batch, a batch of mixed lengths cut where padding costs more than another pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError

RUNTIME_KINDS = ("onnx", "int8")
"""Export kinds that run on ONNX Runtime; merged and adapter exports are Transformers/PEFT
folders, loaded with those libraries."""


def read_meta(folder: str | Path) -> dict:
    """export.json of an export folder; a clear error for any other folder."""
    path = Path(folder) / "export.json"
    if not path.is_file():
        raise TunelabError(f"{folder} is not a tunelab export (no export.json); make one with "
                           "tunelab export RUN_DIR --to onnx|int8")
    return json.loads(path.read_text())


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / "export.json").is_file()


def load(folder: str | Path, threads: int | None = None, batch_size: int = 64) -> "OnnxPredictor":
    """The predictor of an onnx or int8 export; other kinds are an error naming what to use."""
    meta = read_meta(folder)
    if meta["kind"] not in RUNTIME_KINDS:
        raise TunelabError(f"{folder} is a {meta['kind']} export; only onnx and int8 exports "
                           f"run without their run: use the run itself ({meta['run']})")
    return OnnxPredictor(Path(folder), threads, batch_size)


class OnnxPredictor:
    """An ONNX Runtime session and the run's tokenizer, answering as `Predictor` does."""

    bf16 = False

    def __init__(self, folder: Path, threads: int | None = None, batch_size: int = 64):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from tunelab.config import DataConfig

        self.meta = read_meta(folder)
        self.kind = self.meta["kind"]
        self.precision = "int8" if self.kind == "int8" else "fp32"
        self.labels: list[str] = self.meta["labels"]
        self.max_length: int = self.meta["max_length"]
        self.batch_size = batch_size
        self.run_dir = Path(folder)
        # columns of the run's data, for predict_file; exports made before they were recorded
        # read the default columns
        self.data = DataConfig(**self.meta.get("data", {}))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1  # one graph at a time: the batcher is the only caller
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def logits(self, texts: list[str], pairs: list[str] | None = None) -> torch.Tensor:
        """(N, C) fp32 logits in input order."""
        from tunelab.tasks import classification as cls_task
        from tunelab.train.batching import SPLIT_COST_TOKENS, eval_batches

        data = cls_task.encode(self.tokenizer, list(texts), list(pairs) if pairs else None,
                               [0] * len(texts), self.max_length)
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        for idx in eval_batches(data.lengths, self.batch_size, SPLIT_COST_TOKENS):
            batch = cls_task.collate(data, idx, self.tokenizer.pad_token_id)
            feed = {name: batch[name].numpy() for name in self.inputs}  # (B, T) int64 each
            out[idx] = self.session.run(["logits"], feed)[0]
        return torch.from_numpy(out)

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        from tunelab.predict import as_predictions

        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap a single text in a list")
        if not texts:
            return []
        return as_predictions(self.logits(texts, pairs), self.labels)

    def predict_file(self, path: str, format: str = "auto", chunk: int = 2048) -> list[dict]:
        """Every input row with `predicted_label` and `score` added (`tunelab predict`)."""
        from tunelab.predict import predict_rows

        return predict_rows(self, path, self.data, format, chunk)
