"""`tunelab verify RUN_DIR [EXPORT_DIR...] [--url URL]`: the same probe inputs through the
original run, every export and a live server; the largest difference and the prediction
agreement for each, against the run in fp32.

Tolerances. Exports are compared on logits (largest absolute difference):
    merged, adapter   1e-4   the same arithmetic up to summation order
    onnx              1e-3   ONNX Runtime's kernels
    int8              none on logits; predictions must agree on >= 99% of the probes
A server (`--url`) answers probabilities, so those are compared, by what /v1/models says it
runs:
    served fp32       1e-4   the run's engine in fp32, batched with other texts
    served bf16       5e-2   bf16 autocast keeps ~3 significant digits; a MiniLM LoRA run
                             moved by up to 0.015 on 1,821 SST-2 sentences (largest near 0.5,
                             where a logit change moves the probability most); predictions
                             must agree on >= 99.5%
    served onnx       1e-3   an onnx export behind the server
    served int8       none; predictions must agree on >= 99%
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.exported import OnnxPredictor, read_meta

TOLERANCE = {"merged": 1e-4, "adapter": 1e-4, "onnx": 1e-3, "int8": None,
             "served fp32": 1e-4, "served bf16": 5e-2, "served onnx": 1e-3, "served int8": None}
MIN_AGREEMENT = {"merged": 1.0, "adapter": 1.0, "onnx": 1.0, "int8": 0.99, "served fp32": 1.0,
                 "served bf16": 0.995, "served onnx": 1.0, "served int8": 0.99}
SERVER_CHUNK = 32
"""Texts per /v1/classify request (under any sensible --max-texts)."""


@dataclass
class Check:
    target: str
    kind: str
    max_abs_diff: float
    """Of logits for an export, of probabilities for a server."""
    agreement: float
    passed: bool
    note: str = ""
    """Why it failed, where more can be said than the numbers."""


def export_logits(folder: Path, texts: list[str], pairs=None, batch_size: int = 64) -> torch.Tensor:
    """(N, C) logits of an export folder, in input order."""
    meta = read_meta(folder)
    if meta["kind"] in ("onnx", "int8"):
        return OnnxPredictor(folder, batch_size=batch_size).logits(texts, pairs)
    from tunelab.predict import Predictor

    if meta["kind"] == "merged":
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


@dataclass
class Server:
    """A live `tunelab serve` to check (`--url`, `--model`, `--api-key`)."""

    url: str
    model: str | None = None
    """Served name to ask for; default: the run's folder name (what `tunelab serve RUN_DIR`
    and `tunelab serve EXPORT_DIR` serve it as)."""
    api_key: str | None = None


def verify(run_dir: str | Path, exports: list[str | Path], texts: list[str], pairs=None,
           server: Server | None = None) -> list[Check]:
    from tunelab.predict import Predictor

    predictor = Predictor.from_run(run_dir, precision="fp32", merge=False)
    reference = predictor.logits(texts, pairs)
    checks = []
    for folder in map(Path, exports):
        kind = read_meta(folder)["kind"]
        checks.append(judge(str(folder), kind, export_logits(folder, texts, pairs), reference))
    if server is not None:
        checks.append(check_server(server, Path(run_dir), predictor.labels,
                                   reference.softmax(-1), texts, pairs))
    return checks


def judge(target: str, kind: str, got: torch.Tensor, want: torch.Tensor,
          note: str = "") -> Check:
    diff = float((got.double() - want.double()).abs().max())
    agree = float((got.argmax(-1) == want.argmax(-1)).double().mean())
    tol = TOLERANCE[kind]
    ok = agree >= MIN_AGREEMENT[kind] and (tol is None or diff <= tol)
    return Check(target, kind, diff, agree, ok, "" if ok else note)


def check_server(server: Server, run_dir: Path, labels: list[str], reference: torch.Tensor,
                 texts: list[str], pairs=None) -> Check:
    """The probes through the server's /v1/classify; its probabilities against `reference`
    (the run's fp32 probabilities), judged by what /v1/models says the server runs."""
    import httpx

    name = server.model or run_dir.resolve().name
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    url = server.url.rstrip("/")
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        served = served_model(client, url, name)
        if served["labels"] != labels:
            raise TunelabError(f"model {name!r} at {url} has the labels {served['labels']}, "
                               f"{run_dir} has {labels}: the server serves another run "
                               f"({served['run_dir']}); pass --model NAME to pick the right one")
        probs = []
        for start in range(0, len(texts), SERVER_CHUNK):
            body = {"model": name, "texts": texts[start:start + SERVER_CHUNK]}
            if pairs is not None:
                body["text_pairs"] = pairs[start:start + SERVER_CHUNK]
            answer = call(client, url, "POST", "/v1/classify", json=body)
            probs += [[p["scores"][label] for label in labels] for p in answer["predictions"]]
    kind = f"served {served.get('export') or served['precision']}"
    note = (f"model {name!r} at {url} answers unlike {run_dir}; the server says it serves "
            f"{served['run_dir']} ({served.get('backend', 'torch')}, "
            f"{served['precision']})")
    return judge(f"{url} {name}", kind, torch.tensor(probs, dtype=torch.float64), reference,
                 note)


def served_model(client, url: str, name: str) -> dict:
    """What the server's /v1/models says about `name`; a clear error when it cannot be
    checked (not served, not a classifier)."""
    models = {m["name"]: m for m in call(client, url, "GET", "/v1/models")["models"]}
    if name not in models:
        raise TunelabError(f"{url} serves no model named {name!r} (it serves: "
                           f"{', '.join(models) or 'nothing'}); pass --model NAME")
    served = models[name]
    if "/v1/classify" not in served["endpoints"]:
        raise TunelabError(f"model {name!r} at {url} is a {served['task']} run; verify checks "
                           "classification runs")
    return served


def call(client, url: str, method: str, path: str, **kwargs) -> dict:
    import httpx

    try:
        r = client.request(method, path, **kwargs)
    except httpx.TransportError as e:
        raise TunelabError(f"cannot reach {url}{path}: {e} (is tunelab serve running there?)") from None
    if r.status_code == 401:
        raise TunelabError(f"{url} needs an API key: pass --api-key KEY (or set "
                           "$TUNELAB_API_KEY)")
    if r.status_code != 200:
        try:
            why = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = r.text[:300]
        raise TunelabError(f"{method} {url}{path} answered {r.status_code}: {why}")
    return r.json()


def rule(kind: str) -> str:
    tol = TOLERANCE[kind]
    what = "p" if kind.startswith("served") else "logit"
    agree = MIN_AGREEMENT[kind]
    parts = ([f"|Δ{what}| ≤ {tol:g}"] if tol is not None else []) + (
        [f"agree ≥ {agree:.1%}".replace(".0%", "%")] if agree < 1 else [])
    return ", ".join(parts)


def format_checks(checks: list[Check], n: int) -> str:
    lines = [f"{n} probe inputs; reference: the run in fp32 (exports: logits; servers: "
             "probabilities)",
             f"{'target':<50}{'kind':<13}{'max |Δ|':>10}{'agreement':>11}  result"]
    for c in checks:
        lines.append(f"{c.target[-50:]:<50}{c.kind:<13}{c.max_abs_diff:>10.2e}"
                     f"{c.agreement:>10.2%}  {'ok' if c.passed else 'FAIL'} ({rule(c.kind)})")
    lines += [f"FAIL: {c.note}" for c in checks if c.note]
    return "\n".join(lines)
