"""`tunelab verify RUN_DIR EXPORT_DIR...`: the same probe inputs through the original run and
every export; the largest logit difference and the prediction agreement for each.

Tolerances (largest absolute logit difference against the run in fp32):
    merged, adapter   1e-4   the same arithmetic up to summation order
    onnx              1e-3   ONNX Runtime's kernels
    int8              none on logits; predictions must agree on >= 99% of the probes
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError

TOLERANCE = {"merged": 1e-4, "adapter": 1e-4, "onnx": 1e-3, "int8": None}
MIN_AGREEMENT = {"merged": 1.0, "adapter": 1.0, "onnx": 1.0, "int8": 0.99}


@dataclass
class Check:
    target: str
    kind: str
    max_abs_diff: float
    agreement: float
    passed: bool


def export_logits(folder: Path, texts: list[str], pairs=None, batch_size: int = 64) -> torch.Tensor:
    """(N, C) logits of an export folder, in input order."""
    meta = json.loads((folder / "export.json").read_text())
    kind = meta["kind"]
    if kind in ("onnx", "int8"):
        return OnnxClassifier(folder).logits(texts, pairs, batch_size)
    from tunelab.predict import Predictor

    if kind == "merged":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model, tokenizer = load_adapter_export(folder, meta)
    predictor = Predictor(model, tokenizer, meta["labels"], meta["max_length"], bf16=False,
                          batch_size=batch_size)
    return predictor.logits(texts, pairs)


def load_adapter_export(folder: Path, meta: dict):
    """Base model of the source run + the exported adapter (PEFT or tunelab format)."""
    from tunelab import runs
    from tunelab.config import resolve_config
    from tunelab.methods import registry
    from tunelab.tasks import get_task

    run_dir = Path(meta["run"])
    config = resolve_config(run_dir / "config.yaml")
    built = get_task(config).build_model(meta["labels"])
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(built.model, folder).eval(), built.tokenizer
    env = runs.read_json(run_dir / "env.json")
    ctx = registry.context_for(config, built, env.get("total_steps"))
    model = registry.apply_method(built.model, config.method.name, config.method.settings, ctx)
    runs.load_state_dict_into(model, folder)
    return model.eval(), built.tokenizer


class OnnxClassifier:
    """ONNX Runtime session + tokenizer; batches sorted by length like the torch engine."""

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.meta = json.loads((folder / "export.json").read_text())

    def logits(self, texts, pairs=None, batch_size: int = 64) -> torch.Tensor:
        enc = self.tokenizer(list(texts), list(pairs) if pairs else None, truncation=True,
                             max_length=self.meta["max_length"])
        order = sorted(range(len(texts)), key=lambda i: -len(enc["input_ids"][i]))
        out = np.zeros((len(texts), len(self.meta["labels"])), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            feats = [{k: enc[k][i] for k in enc.keys() if k in self.inputs} for i in idx]
            batch = self.tokenizer.pad(feats, return_tensors="np")
            feed = {k: batch[k].astype(np.int64) for k in self.inputs}
            out[idx] = self.session.run(["logits"], feed)[0]
        return torch.from_numpy(out)


def verify(run_dir: str | Path, exports: list[str | Path], texts: list[str],
           pairs=None) -> list[Check]:
    from tunelab.predict import Predictor

    reference = Predictor.from_run(run_dir, precision="fp32").logits(texts, pairs)
    checks = []
    for folder in map(Path, exports):
        if not (folder / "export.json").exists():
            raise TunelabError(f"{folder} is not a tunelab export (no export.json)")
        kind = json.loads((folder / "export.json").read_text())["kind"]
        logits = export_logits(folder, texts, pairs)
        diff = float((logits - reference).abs().max())
        agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
        tol = TOLERANCE[kind]
        ok = agree >= MIN_AGREEMENT[kind] and (tol is None or diff <= tol)
        checks.append(Check(str(folder), kind, diff, agree, ok))
    return checks


def format_checks(checks: list[Check], n: int) -> str:
    lines = [f"{n} probe inputs; reference: the run in fp32",
             f"{'target':<50}{'kind':<9}{'max |Δlogit|':>14}{'agreement':>11}  result"]
    for c in checks:
        tol = TOLERANCE[c.kind]
        rule = f"≤ {tol:g}" if tol is not None else f"agree ≥ {MIN_AGREEMENT[c.kind]:.0%}"
        lines.append(f"{c.target[-50:]:<50}{c.kind:<9}{c.max_abs_diff:>14.2e}"
                     f"{c.agreement:>10.2%}  {'ok' if c.passed else 'FAIL'} ({rule})")
    return "\n".join(lines)
