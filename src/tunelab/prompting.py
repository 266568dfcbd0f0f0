"""Prompt-based few-shot fine-tuning: PET and LM-BFF.

Schick & Schütze 2021, "Exploiting Cloze Questions for Few Shot Text Classification and
Natural Language Inference" (PET, arXiv 2001.07676), and Gao et al. 2021, "Making Pre-trained
Language Models Better Few-shot Learners" (LM-BFF, arXiv 2012.15723). A *pattern* turns a text
into a cloze question or a prompt ("{text} It was {mask}." for a masked LM, "Review: {text}\\n
Sentiment:" for a causal LM) and a *verbaliser* maps each label to words ("great" /
"terrible"). A label's score is what the pretrained LM head says about its words, and training
is cross-entropy over the C label scores (LM-BFF's objective). Unlike a new classification
head, which starts random, the classifier is the zero-shot prompt at step 0, so 8-16 examples
per class refine a guess that is already better than chance.

Two kinds of model behind one class:
  masked LM  (a `tunelab pretrain` run, a hub BERT/RoBERTa): score = log-probability of the
             verbaliser token at the mask. Verbalisers must be single tokens (PET's rule).
  causal LM  (smollm2, gemma3-270m): score = log-probability of the verbaliser phrase after the
             prompt, averaged over its tokens (lm_scoring.LMScorer's score; multi-token phrases
             allowed).
A label with several verbalisers scores the log of their mean probability.

Several patterns make PET's ensemble: one model per pattern, each trained on the same examples
from the same initial weights; predictions average the patterns' label probabilities (PET then
distils the ensemble on unlabelled text; that step is not done here).

Trains: the whole LM (method full) or the parameters of a registered method (lora, bitfit,
...); the LM head is pretrained, so nothing new is added. Saves: `prompt.json` (labels,
patterns, verbalisers, settings, base model) and per pattern i `pattern-<i>/model/` (full) or
`pattern-<i>/adapter.safetensors` (other methods).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import ConfigError, DataError
from tunelab.prompt_settings import (CAUSAL_PATTERN, FULL_LR, MLM_PATTERN, PromptSettings,
                                     causal_prompt, prompt_settings, split_pattern)
from tunelab.train.frozen import cache_frozen_casts
from tunelab.train.fused_lora import fuse_lora_layers
from tunelab.train.grouped import group_projections

# --------------------------------------------------------------------------------------------
# the classifier


class PromptClassifier:
    """fit(texts, label ids) -> predict_proba / predict; save(folder) and load(folder).

        clf = PromptClassifier("smollm2", ["negative", "positive"], prompt_settings({
            "patterns": ["Review: {text}\\nSentiment:"], "method": "lora"}))
        clf.fit(texts, label_ids).predict(["a gripping film"])

    `model` is a model name (alias, folder, run directory, hub id) or one per pattern (what
    `load` passes for a saved full fine-tuning).
    """

    def __init__(self, model: str | list[str], labels: list[str],
                 settings: PromptSettings | None = None):
        from tunelab import models
        from tunelab.train.evaluate import resolve_precision

        self.settings = settings or PromptSettings()
        self.labels = list(labels)
        sources = [str(m) for m in model] if isinstance(model, list) else None
        self.base_model = sources[0] if sources else str(model)
        self.tokenizer = models.load_tokenizer(self.base_model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.family = models.model_family(models.load_config(self.base_model))
        self.causal = self.family == "decoder"
        self.patterns = self.settings.patterns or [CAUSAL_PATTERN if self.causal else MLM_PATTERN]
        self.verbalizers = self._verbalizers()
        self.groups = [len(self.verbalizers[n]) for n in self.labels]
        self.word_ids = self._encode_verbalizers()
        self._pieces = [self._encode_pattern(p) for p in self.patterns]
        self._wrap = ([], []) if self.causal else self._special_tokens()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = resolve_precision(self.settings.precision, self.device.type) == "bf16"
        if sources is not None and len(sources) != len(self.patterns):
            raise ConfigError(f"{len(sources)} models for {len(self.patterns)} patterns")
        self.models = [self._build_model(s) for s in sources or [self.base_model] * len(
            self.patterns)]
        self.losses: list[list[float]] = [[] for _ in self.patterns]
        """Per pattern, the training loss of every step."""

    # -- setup --------------------------------------------------------------------------------
    def _verbalizers(self) -> dict[str, list[str]]:
        given = self.settings.verbalizers
        if given is None:
            return {n: [n] for n in self.labels}
        missing = [n for n in self.labels if n not in given]
        extra = [n for n in given if n not in self.labels]
        if missing or extra:
            raise ConfigError(f"prompt.verbalizers must name every label {self.labels} and no "
                              f"other; missing {missing}, unknown {extra}")
        return {n: given[n] for n in self.labels}

    def _encode_verbalizers(self) -> list[list[int]]:
        """Token ids of every verbaliser, labels in order (flat; `groups` splits them)."""
        tok, out = self.tokenizer, []
        for label in self.labels:
            for word in self.verbalizers[label]:
                ids = tok(self.settings.verbalizer_prefix + word,
                          add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ConfigError(f"verbaliser {word!r} of label {label!r} has no tokens")
                if len(ids) > 1 and not self.causal:
                    raise ConfigError(
                        f"verbaliser {word!r} of label {label!r} is {len(ids)} tokens "
                        f"{tok.convert_ids_to_tokens(ids)} for {self.base_model}; a masked LM "
                        "fills one token per mask (PET's rule): choose a word that is a single "
                        "token (prompt.verbalizers)")
                out.append(ids)
        return out

    def _encode_pattern(self, pattern: str):
        """Masked LM: the pattern's pieces as token ids ("{text}"/"{mask}" kept as markers);
        causal LM: the prompt text, tokenised with each input."""
        if self.causal:
            return causal_prompt(pattern)
        parts = split_pattern(pattern)
        if "{mask}" not in parts:
            raise ConfigError(f"prompt pattern {pattern!r} has no {{mask}}: a masked LM "
                              "predicts the verbaliser at the mask")
        if self.tokenizer.mask_token_id is None:
            raise ConfigError(f"the tokenizer of {self.base_model} has no mask token")
        return [p if p in ("{text}", "{mask}") else
                self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in parts]

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The tokens the tokenizer puts before and after a single text ([CLS] / [SEP],
        <s> / </s>), read off the tokenisation of the mask token alone."""
        mask = self.tokenizer.mask_token_id
        ids = self.tokenizer(self.tokenizer.mask_token)["input_ids"]
        at = ids.index(mask)
        return ids[:at], ids[at + 1:]

    def _build_model(self, source: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        from tunelab import models
        from tunelab.methods import registry

        torch.manual_seed(self.settings.seed)  # new method weights (LoRA's A) depend on it
        if self.causal:
            model = models.load_pretrained(AutoModelForCausalLM, source)
        else:
            model, info = models.load_pretrained(AutoModelForMaskedLM, source,
                                                 output_loading_info=True)
            missing = sorted(info.get("missing_keys", []))
            if missing:
                raise ConfigError(
                    f"{source} has no masked-LM head: {', '.join(missing[:3])}"
                    f"{' ...' if len(missing) > 3 else ''} would be newly initialised, so the "
                    "mask predictions would be random. Train the head first with continued "
                    "masked-LM pretraining (`tunelab pretrain configs/pretrain/"
                    "en_minilm_dapt.yaml`, then model.name=<that run>), or prompt a causal LM "
                    "instead (smollm2 + LoRA: configs/fewshot/sst2_prompt.yaml)")
        method = self.settings.method
        ctx = registry.ApplyContext("causal_lm" if self.causal else "mlm", [], self.family)
        model = registry.apply_method(model, method.name, method.settings, ctx)
        cache_frozen_casts(model)
        fuse_lora_layers(model)
        group_projections(model)
        return model.to(self.device)

    # -- scores -------------------------------------------------------------------------------
    def label_scores(self, index: int, texts: list[str]) -> torch.Tensor:
        """(N, C) log-scores of pattern `index`'s model (its label logits): each label's
        verbalisers pooled as the log of their mean probability. With gradients."""
        from tunelab.lm_scoring import log_mean_exp
        from tunelab.train.evaluate import autocast

        with autocast(self.device.type, self.bf16):
            words = (self._causal_scores if self.causal else self._mlm_scores)(index, texts)
        return log_mean_exp(words.float(), self.groups)

    def _mlm_scores(self, index: int, texts: list[str]) -> torch.Tensor:
        """(N, W) log p(word at the mask) of every verbaliser word."""
        from tunelab.zeroshot import pad_right

        encoded = [self._mlm_ids(self._pieces[index], t) for t in texts]
        input_ids, mask = pad_right([ids for ids, _ in encoded], self.tokenizer.pad_token_id)
        logits = self.models[index](input_ids=input_ids.to(self.device),
                                    attention_mask=mask.to(self.device)).logits  # (N, T, V)
        rows = torch.arange(len(texts), device=self.device)
        at_mask = logits[rows, torch.tensor([m for _, m in encoded], device=self.device)]
        words = torch.tensor([ids[0] for ids in self.word_ids], device=self.device)
        return at_mask.float().log_softmax(-1)[:, words]

    def _mlm_ids(self, pieces: list, text: str) -> tuple[list[int], int]:
        """(token ids with special tokens, index of the mask): the text is cut at its end to
        fit max_length, the pattern never."""
        tok = self.tokenizer
        fixed = sum(len(p) for p in pieces if isinstance(p, list)) + 1
        room = self.settings.max_length - fixed - len(self._wrap[0]) - len(self._wrap[1])
        if room < 1:
            raise ConfigError(f"prompt.max_length={self.settings.max_length} leaves no room "
                              "for the text beside the pattern")
        text_ids = tok(text, add_special_tokens=False)["input_ids"][:room]
        body: list[int] = []
        for p in pieces:
            body += text_ids if p == "{text}" else [tok.mask_token_id] if p == "{mask}" else p
        lead, trail = self._wrap
        # the mask's place is counted, not searched: a text may itself spell out "[MASK]"
        return lead + body + trail, len(lead) + _mask_index(pieces, len(text_ids))

    def _causal_scores(self, index: int, texts: list[str]) -> torch.Tensor:
        """(N, W) per-token log p(verbaliser | prompt), as lm_scoring.LMScorer scores it: each
        prompt runs once (lm_scoring.score_after_prompts; gradients flow through the key/value
        cache too), or, for a model without a cache, every (prompt, verbaliser) pair."""
        from tunelab.lm_scoring import cache_argument, score_after_prompts, score_continuations

        model, tok, n_words = self.models[index], self.tokenizer, len(self.word_ids)
        prompts = [self._pieces[index].replace("{text}", t) for t in texts]
        prompt_ids = tok(prompts)["input_ids"]
        several = any(len(ids) > 1 for ids in self.word_ids)
        if several and not cache_argument(model):
            pairs = [(i, j) for i in range(len(texts)) for j in range(n_words)]
            scores = score_continuations(model, tok, [prompt_ids[i] for i, _ in pairs],
                                         [self.word_ids[j] for _, j in pairs],
                                         self.settings.max_length, length_norm=True)
            return scores.view(len(texts), n_words)
        return score_after_prompts(model, tok, prompt_ids, self.word_ids,
                                   self.settings.max_length, length_norm=True)

    # -- training -----------------------------------------------------------------------------
    def fit(self, texts: list[str], labels: list[int]) -> "PromptClassifier":
        """Train every pattern's model on the examples (label ids into `labels`)."""
        if len(texts) != len(labels):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise DataError("prompt-based fine-tuning needs at least one example")
        bad = [y for y in labels if not 0 <= y < len(self.labels)]
        if bad:
            raise DataError(f"label id {bad[0]} is not an id into {self.labels}")
        for index in range(len(self.patterns)):
            self.losses[index] = self._train(index, list(texts), list(labels))
        return self

    def _train(self, index: int, texts: list[str], labels: list[int]) -> list[float]:
        """LM-BFF's objective: cross-entropy over the label scores."""
        from tunelab.methods import registry
        from tunelab.train.embedding_grads import EmbeddingGrads
        from tunelab.train.memory import keep_freed_memory, release_heap
        from tunelab.train.optim import build_optimizer, build_scheduler

        s, model = self.settings, self.models[index]
        lr = s.lr or (FULL_LR if s.method.name == "full" else
                      registry.get_method(s.method.name).default_lr)
        steps = s.epochs * math.ceil(len(texts) / s.batch_size)
        optimizer = build_optimizer(model, lr, s.weight_decay)
        scheduler = build_scheduler(optimizer, "linear", steps, s.warmup_ratio)
        generator = torch.Generator().manual_seed(s.seed)
        torch.manual_seed(s.seed)  # dropout
        from tqdm.auto import tqdm

        losses = []
        # full fine-tuning: the word embedding trains; GPUs have no use for kept gradients
        kept = EmbeddingGrads(model) if self.device.type == "cpu" else None
        keep_freed_memory()  # as `tunelab train` does: no page faults at every step
        model.train()
        bar = tqdm(total=steps, unit="step", desc=f"prompt {index + 1}/{len(self.patterns)}",
                   dynamic_ncols=True, mininterval=1.0, leave=False)
        for _ in range(s.epochs):
            order = torch.randperm(len(texts), generator=generator).tolist()
            for start in range(0, len(order), s.batch_size):
                batch = order[start:start + s.batch_size]
                if kept:
                    kept.attach()
                scores = self.label_scores(index, [texts[i] for i in batch])  # (B, C)
                target = torch.tensor([labels[i] for i in batch], device=scores.device)
                loss = torch.nn.functional.cross_entropy(scores, target)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.close()
        model.eval()
        release_heap()
        return losses

    # -- prediction ---------------------------------------------------------------------------
    def pattern_probabilities(self, texts: list[str]) -> np.ndarray:
        """(P, N, C) label probabilities of every pattern's model, columns in `labels` order."""
        texts = list(texts)
        out = np.zeros((len(self.patterns), len(texts), len(self.labels)))
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # less padding
        step = self.settings.eval_batch_size
        for index, model in enumerate(self.models):
            model.eval()
            with torch.inference_mode():
                for start in range(0, len(order), step):
                    idx = order[start:start + step]
                    scores = self.label_scores(index, [texts[i] for i in idx])
                    out[index, idx] = scores.double().softmax(-1).cpu().numpy()
        return out

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N, C) probabilities: the mean of the patterns' probabilities (PET's ensemble)."""
        return self.pattern_probabilities(texts).mean(0)

    def predict(self, texts: list[str]) -> list[dict]:
        """[{'label', 'score', 'scores'}] as tunelab.load(...).predict returns."""
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap a single text in a list")
        from tunelab.predict import probabilities_as_predictions

        return probabilities_as_predictions(self.predict_proba(texts), self.labels) if texts else []

    # -- saving -------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the classifier atomically: a crash never leaves half a folder behind."""
        from safetensors.torch import save_file

        from tunelab.io import replace_dir, staging_dir
        from tunelab.methods import registry

        folder = Path(folder)
        tmp = staging_dir(folder)
        for index, model in enumerate(self.models):
            target = tmp / f"pattern-{index}"
            if self.settings.method.name == "full":
                model.save_pretrained(target / "model", safe_serialization=True)
                self.tokenizer.save_pretrained(target / "model")
            else:
                target.mkdir(parents=True)
                state = {k: v.contiguous() for k, v in registry.trainable_state_dict(model).items()}
                save_file(state, str(target / "adapter.safetensors"))
        settings = {**self.settings.to_dict(), "patterns": self.patterns,
                    "verbalizers": self.verbalizers}
        meta = {"kind": "prompt", "base_model": self.base_model, "labels": self.labels,
                "model_kind": "causal_lm" if self.causal else "masked_lm",
                "settings": settings}
        (tmp / "prompt.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False),
                                         encoding="utf-8")
        replace_dir(tmp, folder)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "PromptClassifier":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path = folder / "prompt.json"
        if not meta_path.is_file():
            raise ConfigError(f"{folder} is not a saved prompt classifier (no prompt.json)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        settings = prompt_settings(meta["settings"])
        full = [folder / f"pattern-{i}" / "model" for i in range(len(settings.patterns))]
        source = [str(p) for p in full] if settings.method.name == "full" else meta["base_model"]
        clf = cls(source, meta["labels"], settings)
        clf.base_model = meta["base_model"]
        if settings.method.name != "full":
            for index, model in enumerate(clf.models):
                path = folder / f"pattern-{index}" / "adapter.safetensors"
                result = model.load_state_dict(load_file(str(path)), strict=False)
                if result.unexpected_keys:
                    raise ConfigError(f"{path} does not fit {meta['base_model']} with method "
                                      f"{settings.method.name}")
        for model in clf.models:
            model.eval()
        return clf


def _mask_index(pieces: list, text_len: int) -> int:
    """Position of the mask in the body the pieces make (the text being text_len tokens)."""
    at = 0
    for p in pieces:
        if p == "{mask}":
            return at
        at += text_len if p == "{text}" else len(p)
    raise AssertionError("a masked-LM pattern has a {mask}")  # checked in _encode_pattern
