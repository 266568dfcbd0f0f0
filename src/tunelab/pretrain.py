"""Pretraining from scratch: a tokenizer trained on the corpus, a randomly initialised model of
a named size, and the rules of `tunelab pretrain`.

Sizes are the compact BERTs of Turc et al. 2019, "Well-Read Students Learn Better: On the
Importance of Pre-training Compact Models" (arXiv 1908.08962): the same layer/width grid serves
BERT (mlm) and Llama (causal_lm, whose feed-forward has three matrices instead of two).

Trained tokenizers are cached in ``models.cache_dir()/tokenizers/<key>`` (key: the training
files as they are, the choice, the vocabulary size), so that a resumed run, `tunelab check`
and the token cache all see the very same tokenizer without training it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

from tunelab.config import RunConfig
from tunelab.errors import ConfigError

SIZES = {
    "tiny": {"layers": 2, "hidden": 128, "heads": 2, "intermediate": 512},
    "mini": {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024},
    "small": {"layers": 4, "hidden": 512, "heads": 8, "intermediate": 2048},
}
TRAINED = ("wordpiece", "bpe", "char")
"""`model.tokenizer` values that train a new tokenizer on the corpus."""
OBJECTIVES = ("mlm", "causal_lm")
SCRATCH_LR = 5e-4
"""The learning rate `tunelab pretrain` uses from scratch when train.lr is unset: a random
model needs ~10x the fine-tuning rate (BERT-small-sized models train at 1e-4 to 1e-3)."""
MIN_POSITIONS = 512
"""Position embeddings built even when the blocks are shorter, so that a later fine-tuning run
may use longer inputs (the extra positions start untrained)."""

# `model.tokenizer` -> the tunelab.tiny tokenizer kind, per objective
_TOKENIZER_KINDS = {
    "mlm": {"wordpiece": "bert", "char": "char", "bpe": "roberta"},
    "causal_lm": {"bpe": "llama", "wordpiece": "bert", "char": "char"},
}


def default_tokenizer(objective: str) -> str:
    return "wordpiece" if objective == "mlm" else "bpe"


def scratch_tokenizer(model_cfg, objective: str, source):
    """The tokenizer of a from-scratch run: trained on `source` (the training documents) and
    cached, or loaded from the folder/alias `model.tokenizer` names."""
    from tunelab import models

    choice = model_cfg.tokenizer or default_tokenizer(objective)
    if choice not in TRAINED:
        tokenizer = models.load_tokenizer(choice)
    else:
        positions = max(model_cfg.max_length, MIN_POSITIONS)
        key = {"choice": choice, "objective": objective, "vocab_size": model_cfg.vocab_size,
               "positions": positions, "source": source.fingerprint()}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        folder = models.cache_dir() / "tokenizers" / digest
        if not (folder / "tokenizer_config.json").is_file():
            _train_into(folder, _TOKENIZER_KINDS[objective][choice], source, model_cfg.vocab_size,
                        positions)
        tokenizer = models.load_tokenizer(str(folder))
    if objective == "causal_lm" and tokenizer.eos_token is None and tokenizer.sep_token:
        tokenizer.eos_token = tokenizer.sep_token  # WordPiece/char: [SEP] ends a document
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _train_into(folder, kind: str, source, vocab_size: int, positions: int) -> None:
    from tunelab import tiny
    from tunelab.io import staging_dir

    tmp = staging_dir(folder)
    try:
        tokenizer = tiny.train_tokenizer(kind, source.texts(), vocab_size, positions)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "tokenizer_config.json").is_file():  # else a concurrent build won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_ARCHITECTURES = {"mlm": ("bert", "roberta-prelayernorm"), "causal_lm": ("llama",)}
"""`model.architecture` values per objective; the first is the default."""


def scratch_model(objective: str, size: str, tokenizer, max_length: int, seed: int,
                  architecture: str | None = None, dropout: float | None = None):
    """A randomly initialised masked LM (BERT, or pre-LayerNorm RoBERTa) or LlamaForCausalLM
    whose vocabulary is the tokenizer's; the same seed gives the same weights."""
    import torch
    from transformers import (BertForMaskedLM, LlamaForCausalLM, RobertaPreLayerNormConfig,
                              RobertaPreLayerNormForMaskedLM)

    from tunelab import tiny

    architecture = architecture or _ARCHITECTURES[objective][0]
    if architecture not in _ARCHITECTURES[objective]:
        raise ConfigError(f"model.architecture={architecture} cannot train {objective}; choose "
                          f"{' or '.join(_ARCHITECTURES[objective])}")
    dims = dict(SIZES[size], vocab=len(tokenizer), max_position=max(max_length, MIN_POSITIONS))
    torch.manual_seed(seed)
    if architecture == "llama":
        config = tiny.llama_config(tokenizer, **dims)
        if dropout is not None:
            config.attention_dropout = dropout
        return LlamaForCausalLM(config)
    config = tiny.bert_config(tokenizer, **dims)
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    if architecture == "bert":
        return BertForMaskedLM(config)
    # RoBERTa numbers positions from pad_token_id + 1: room for the offset; the BERT-style
    # tokenizer's [CLS]/[SEP] stand in for <s>/</s>
    fields = config.to_dict()
    fields["max_position_embeddings"] += tokenizer.pad_token_id + 1
    fields.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    return RobertaPreLayerNormForMaskedLM(RobertaPreLayerNormConfig(**fields))


def pretrain_config(recipe: str | None, overrides: list[str]) -> RunConfig:
    """The config of `tunelab pretrain`: a recipe that names no task is masked LM, a corpus is
    required, and a model built from scratch gets SCRATCH_LR when train.lr is unset (the
    value is written to the run's config.yaml like any other)."""
    from tunelab.config import load_recipe, merge_override, parse_override, resolve_config

    tree = load_recipe(recipe)
    for text in overrides:
        path, value = parse_override(text)
        merge_override(tree, path, value)
    task = tree.get("task")
    if task is None:
        tree["task"] = "mlm"
    elif isinstance(task, dict) and "name" not in task:
        task["name"] = "mlm"
    config = resolve_config(tree=tree)
    if config.task.name not in OBJECTIVES:
        raise ConfigError(f"tunelab pretrain trains task mlm or causal_lm, not "
                          f"{config.task.name}; use `tunelab train` for that task")
    if not config.data.train:
        raise ConfigError("tunelab pretrain needs a corpus: set data.train to a .txt file (one "
                          "document per line), a .jsonl file with a text field, a folder of "
                          "them, or several separated by commas")
    if config.model.size and config.train.lr is None:
        config.train.lr = SCRATCH_LR
    return config
