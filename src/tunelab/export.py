"""`tunelab export RUN_DIR --to merged|adapter|onnx|int8`: ship a trained run.

    merged   the method folded into the base weights: a plain Transformers folder that loads
             with AutoModelForSequenceClassification and no tunelab installed
    adapter  the trained parameters only (head included): PEFT's format for PEFT methods,
             tunelab's (weights.safetensors + meta.json) for the others
    onnx     the merged model as ONNX (ONNX Runtime, dynamic batch and length)
    int8     the ONNX model, SmoothQuant-ed on the run's training texts, with int8 weights and
             dynamic int8 activations (VNNI/AMX-INT8 CPUs); feed-forward outputs stay fp32

Every export folder holds export.json (kind, labels, source run, base model, text columns)
and the tokenizer, so `tunelab verify` knows how to run it, and onnx/int8 exports run without
their run: `tunelab predict EXPORT_DIR`, `tunelab serve EXPORT_DIR`, `tunelab.exported.load`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tunelab import runs
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_json, replace_dir, staging_dir
from tunelab.methods import registry

KINDS = ("merged", "adapter", "onnx", "int8")


def export(run_dir: str | Path, kind: str, out: str | Path | None = None) -> Path:
    from tunelab.predict import Predictor

    if kind not in KINDS:
        raise TunelabError(f"--to must be one of {', '.join(KINDS)}; got {kind!r}")
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "export" / kind
    predictor = Predictor.from_run(run_dir, precision="fp32", merge=False)
    tmp = staging_dir(out)
    try:
        {"merged": _merged, "adapter": _adapter, "onnx": _onnx, "int8": _int8}[kind](
            predictor, tmp)
        predictor.tokenizer.save_pretrained(tmp)
        data = predictor.config.data
        atomic_write_json(tmp / "export.json", {
            "kind": kind, "labels": predictor.labels, "run": str(run_dir),
            "method": predictor.config.method.name, "max_length": predictor.max_length,
            "base_model": predictor.config.model.name,
            "data": {"text_column": data.text_column,
                     "text_pair_column": data.text_pair_column}})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out


def merged_model(predictor) -> torch.nn.Module:
    """A plain Transformers model with the method folded in."""
    spec = registry.get_method(predictor.config.method.name)
    if spec.saves == "model":
        return predictor.model
    if not spec.mergeable:
        mergeable = ", ".join(m.name for m in registry.all_methods() if m.mergeable)
        raise TunelabError(f"method {spec.name} cannot be merged into the base weights "
                           f"(mergeable: {mergeable}); export it with --to adapter")
    if spec.merge is not None:
        return spec.merge(predictor.model)
    return predictor.model  # methods that only change existing weights (freeze, bitfit)


def _merged(predictor, tmp: Path) -> None:
    model = merged_model(predictor)
    model.save_pretrained(tmp, safe_serialization=True)


def _adapter(predictor, tmp: Path) -> None:
    from peft import PeftModel

    spec = registry.get_method(predictor.config.method.name)
    if spec.saves == "model":
        raise TunelabError("full fine-tuning has no adapter: export it with --to merged")
    if isinstance(predictor.model, PeftModel):
        predictor.model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        return
    source = runs.existing_dir(predictor.run_dir / "adapter")
    for f in source.iterdir():  # tunelab's own format: weights.safetensors + meta.json
        shutil.copy2(f, tmp / f.name)


class _LogitsOnly(torch.nn.Module):
    """ONNX export wants tensors out, not a ModelOutput."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(**kwargs).logits


def _onnx(predictor, tmp: Path, model: torch.nn.Module | None = None) -> None:
    import warnings

    model = _LogitsOnly((model if model is not None else merged_model(predictor)).eval())
    enc = predictor.tokenizer(["a short probe sentence", "another"], padding=True,
                              return_tensors="pt")
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in enc
                                               else [])
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, tuple(enc[n] for n in names), str(tmp / "model.onnx"),
                          input_names=names, output_names=["logits"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)


CALIBRATION_TEXTS = 512
"""Training texts whose activations set the SmoothQuant scales of an int8 export."""


def _int8(predictor, tmp: Path) -> None:
    """SmoothQuant-ed encoder (tunelab.smoothquant), exported to ONNX, then dynamic int8
    quantisation (one weight scale per output channel) of the smoothed MatMuls: every Linear
    of the transformer layers except the feed-forward output projections, which stay fp32 like
    the embeddings, pooler and task head.

    Measured on a MiniLM LoRA run, SST-2 test (1,821 sentences), agreement with fp32 predictions:
    every MatMul quantised 98.2%; the feed-forward outputs left in fp32 98.7%; SmoothQuant on
    the others as well 99.6%. Quantising the feed-forward outputs, smoothed or not, cost the
    most (GELU outputs: long-tailed in every channel, which smoothing cannot flatten).
    """
    import copy

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tunelab import smoothquant

    model = copy.deepcopy(merged_model(predictor)).eval()
    intermediate = getattr(model.config, "intermediate_size", None)
    skip = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and (not _in_encoder(model, name) or m.in_features == intermediate)]
    maxima = smoothquant.input_maxima(model, _calibration_batches(predictor), skip=skip)
    smoothquant.smooth(model, maxima)
    fp32_dir = staging_dir(tmp / "fp32")
    try:
        _onnx(predictor, fp32_dir, model)
        source = str(fp32_dir / "model.onnx")
        nodes = _smoothed_matmuls(source)
        if not nodes:  # an empty list would make quantize_dynamic take every MatMul
            raise TunelabError(f"int8 export: no smoothed MatMul found in the ONNX graph of "
                               f"{type(model).__name__}; export --to onnx instead")
        quantize_dynamic(source, str(tmp / "model.onnx"), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=nodes,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        shutil.rmtree(fp32_dir, ignore_errors=True)


def _in_encoder(model, name: str) -> bool:
    """Whether module `name` is in the backbone's transformer layers (not embeddings, pooler
    or task head)."""
    prefix = getattr(model, "base_model_prefix", "")
    return name.startswith(f"{prefix}.") and "pooler" not in name and "embeddings" not in name


def _calibration_batches(predictor) -> list[dict]:
    """Model-input batches of up to CALIBRATION_TEXTS of the run's training texts; the
    packaged demo texts when the run's data can no longer be read."""
    import importlib.resources

    from tunelab.data.classification import read_prediction_inputs
    from tunelab.tasks import get_task

    try:
        examples = get_task(predictor.config).load_data().splits["train"]
    except (TunelabError, OSError):
        demo = importlib.resources.files("tunelab.demo") / "sst2_test.csv"
        examples = read_prediction_inputs(str(demo), type(predictor.config.data)(), "auto")[1]
    examples = examples[:CALIBRATION_TEXTS]
    texts = [e.text for e in examples]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    batches = []
    for i in range(0, len(texts), 32):
        enc = predictor.tokenizer(texts[i:i + 32], pairs[i:i + 32] if pairs else None,
                                  padding=True, truncation=True,
                                  max_length=predictor.max_length, return_tensors="pt")
        batches.append(dict(enc))
    return batches


def _smoothed_matmuls(onnx_path: str) -> list[str]:
    """Names of the MatMul nodes SmoothQuant prepared: a constant weight, and an input that
    comes out of SmoothedLinear's multiply."""
    import onnx

    graph = onnx.load(onnx_path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    smoothed = {out for n in graph.node if n.op_type == "Mul"
                and any(i.endswith(".inv_scale") for i in n.input) for out in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
            and n.input[0] in smoothed]
