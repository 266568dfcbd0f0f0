"""The run directory: everything a run needs to describe, reload and resume itself.

    config.yaml       resolved config (feed it back as a recipe)
    env.json          versions, seed, git hash, precision, threads, config and data hashes
    label_map.json    id -> label name
    preflight.json    rows per split and class, dropped rows with reasons
    metrics.jsonl     one line per logging step and per evaluation
    results.json      final metrics per split
    model/            full fine-tuning: a plain Transformers folder (+ tokenizer)
    adapter/          other methods: weights.safetensors (trained parameters, head included)
                      + method.json; the base model is config.model.name
    tokenizer/        the tokenizer used
    state/            resumable checkpoints: checkpoint-<step>/ and a `latest` pointer
    best/             weights of the best evaluation so far
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.io import (atomic_write_text, existing_dir, replace_dir,
                        staging_dir)

WEIGHTS = "weights.safetensors"


def new_run_dir(config) -> Path:
    if config.run_dir:
        return Path(config.run_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.method.name}"


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(config, extra: dict) -> dict:
    import accelerate
    import peft
    import transformers

    import tunelab

    data_files = {k: getattr(config.data, k) for k in ("train", "validation", "test")}
    return {
        "tunelab": tunelab.__version__, "git": git_hash(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "accelerate": accelerate.__version__,
        "platform": platform.platform(), "seed": config.train.seed,
        "config_hash": config.hash(),
        "data_hashes": {k: file_hash(v) for k, v in data_files.items() if v and Path(v).is_file()},
        "created": dt.datetime.now().isoformat(timespec="seconds"), **extra,
    }


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint we continue from."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


# --------------------------------------------------------------------------------------------
# weights


def trained_state(model: torch.nn.Module, whole: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold: every parameter for full fine-tuning, else the
    trained ones only (head included)."""
    if whole:
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def save_state_dict(state: dict[str, torch.Tensor], folder: Path, extra: dict | None = None):
    """Write tensors (+ a json) into `folder` atomically."""
    tmp = staging_dir(folder)
    save_file(_untie(state), str(tmp / WEIGHTS))
    if extra is not None:
        (tmp / "meta.json").write_text(json.dumps(extra, indent=2))
    replace_dir(tmp, folder)


def _untie(state: dict) -> dict:
    """safetensors refuses tensors that share storage (tied embeddings): copy the duplicates."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_state_dict_into(model: torch.nn.Module, folder: Path) -> None:
    found = existing_dir(folder)
    if found is None:
        raise TunelabError(f"{folder} is missing: the run has no saved weights there")
    state = load_file(str(found / WEIGHTS))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise TunelabError(f"{found}: weights do not fit the model (unexpected "
                           f"{result.unexpected_keys[:3]}...); was the method or base changed?")


def save_final(run_dir: Path, model: torch.nn.Module, tokenizer, spec, method_cfg,
               state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model/ (full fine-tuning) or adapter/ (everything else) atomically. `state`: the
    weights to write when the model's own tensors are shards (FSDP, ZeRO-3; gathered by the
    caller), else the model's are read."""
    if spec.saves == "model":
        final = run_dir / "model"
        tmp = staging_dir(final)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)
        return final
    final = run_dir / "adapter"
    save_state_dict(state if state is not None else trained_state(model, whole=False), final,
                    extra=method_cfg.to_dict())
    tmp = staging_dir(run_dir / "tokenizer")
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, run_dir / "tokenizer")
    return final


# --------------------------------------------------------------------------------------------
# resumable state


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    whole: bool) -> None:
    """Write state/checkpoint-<step>, then point `latest` at it, then drop older ones."""
    state_dir = run_dir / "state"
    name = f"checkpoint-{step}"
    tmp = staging_dir(state_dir / name)
    save_file(_untie(trained_state(model, whole)), str(tmp / WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, tmp / "optim.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
    replace_dir(tmp, state_dir / name)
    atomic_write_text(state_dir / "latest", name)  # the commit point
    for old in state_dir.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "state" / "latest"
    if not pointer.exists():
        return None
    return existing_dir(run_dir / "state" / pointer.read_text().strip())


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    state = load_file(str(ckpt / WEIGHTS))
    model.load_state_dict(state, strict=False)
    extra = torch.load(ckpt / "optim.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return json.loads((ckpt / "trainer.json").read_text())


def rng_state() -> dict:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunelabError(f"{path} is missing: is {Path(path).parent} a tunelab run?") from None


def read_run(run_dir: Path):
    """(config, env, labels) of a finished or running run directory."""
    from tunelab.config import resolve_config

    if not is_run_dir(run_dir):
        raise TunelabError(f"{run_dir} is not a tunelab run (no config.yaml/label_map.json)")
    config = resolve_config(run_dir / "config.yaml")
    env = read_json(run_dir / "env.json")
    label_map = read_json(run_dir / "label_map.json")
    return config, env, [label_map[str(i)] for i in range(len(label_map))]


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "label_map.json").is_file()
