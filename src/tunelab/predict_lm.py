"""Use a finished language-modelling run: perplexity on held-out text (`tunelab eval`), filling
masks (mlm), greedy continuation (causal_lm), and `tunelab predict` over a file of either.

    >>> p = tunelab.load("runs/zh-mlm")
    >>> p.fill_mask(["这个手机质量很[MASK]"], top_k=3)
    >>> tunelab.load("runs/clm").generate(["Once upon a time"], max_new_tokens=20)
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tunelab import runs
from tunelab.errors import TunelabError
from tunelab.tasks import get_task
from tunelab.train.evaluate import autocast, evaluate

MASK_SPELLINGS = re.compile(r"\[MASK\]|<mask>")
"""Users may write either spelling; both become the tokenizer's own mask token."""


class LMPredictor:
    def __init__(self, model, tokenizer, config, bf16: bool, batch_size: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.task = get_task(config)
        self.bf16 = bf16
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.max_length = config.model.max_length
        self.labels: list[str] = []
        self.run_dir: Path | None = None

    @classmethod
    def from_run(cls, run_dir, precision: str = "auto", batch_size: int = 64,
                 merge: bool = True) -> "LMPredictor":
        """precision: auto (what the run trained with), bf16 or fp32; merge: as
        `Predictor.from_run`."""
        from tunelab.predict import load_run_model, run_uses_bf16

        run_dir = Path(run_dir)
        config, env, labels = runs.read_run(run_dir)
        bf16 = run_uses_bf16(env, precision)
        model, tokenizer = load_run_model(run_dir, config, labels, env, merge, bf16)
        predictor = cls(model, tokenizer, config, bf16, batch_size)
        predictor.run_dir = run_dir
        return predictor

    # -- held-out text ---------------------------------------------------------------------
    def evaluate_file(self, path: str, format: str = "auto"):
        """(metrics, Metrics object, dropped rows) on a text corpus (.txt, .jsonl, folder):
        packed into blocks exactly as in training; perplexity = exp(loss per token)."""
        from tunelab.data.corpus import Source, expand_paths

        data = self.config.data
        source = Source(expand_paths(path, "--data"), format=format, text_column=data.text_column,
                        separator=self.task.settings.document_separator)
        encoded = self.task.encode(self.tokenizer, source)
        metrics, tracker = evaluate(self.task, self.model, encoded, [], self.batch_size,
                                    self.tokenizer.pad_token_id, self.device, self.bf16)
        return metrics, tracker, []

    # -- masked LM -------------------------------------------------------------------------
    def fill_mask(self, texts: list[str], top_k: int = 5) -> list[dict]:
        """For each text: its masks' top_k candidates (token, score) and the text with every
        mask filled by its best candidate."""
        if self.task.name != "mlm":
            raise TunelabError(f"fill_mask needs a masked-LM run; this one is {self.task.name}")
        mask = self.tokenizer.mask_token
        texts = [MASK_SPELLINGS.sub(mask, t) for t in texts]
        for i, t in enumerate(texts):
            if mask not in t:
                raise TunelabError(f"text {i + 1} has no mask to fill: write [MASK] where a "
                                   f"word is missing ({t[:60]!r})")
        out = []
        for start in range(0, len(texts), self.batch_size):
            out += self._fill_batch(texts[start:start + self.batch_size], top_k)
        return out

    def _fill_batch(self, texts: list[str], top_k: int) -> list[dict]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt", return_token_type_ids=False)
        with torch.inference_mode(), autocast(self.device.type, self.bf16):
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
        # the embedding matrix may have more rows than the tokenizer has tokens: never offer those
        probs = logits[..., :len(self.tokenizer)].float().softmax(-1).cpu()  # (B, T, V)
        out = []
        for row, text in enumerate(texts):
            ids = enc["input_ids"][row].clone()
            where = (ids == self.tokenizer.mask_token_id).nonzero().flatten()
            masks = []
            for pos in where.tolist():
                scores, best = probs[row, pos].topk(top_k)
                masks.append([{"token": self.tokenizer.convert_ids_to_tokens(int(i)),
                               "score": round(float(s), 6)} for s, i in zip(scores, best)])
                ids[pos] = best[0]
            filled = self.tokenizer.decode(ids[enc["attention_mask"][row].bool()],
                                           skip_special_tokens=True)
            out.append({"text": text, "filled": filled, "masks": masks})
        return out

    # -- causal LM -------------------------------------------------------------------------
    def generate(self, prompts: list[str], max_new_tokens: int = 50) -> list[str]:
        """Greedy continuations, each ending at the end-of-text token or max_new_tokens."""
        from transformers import GenerationConfig

        if self.task.name != "causal_lm":
            raise TunelabError(f"generate needs a causal-LM run; this one is {self.task.name}")
        eos = self.task.separator_id(self.tokenizer)
        settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)
        out = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = ids[-(self.max_length - 1):] or [eos]  # an empty prompt starts a document
            inputs = torch.tensor([ids], device=self.device)
            with torch.inference_mode(), autocast(self.device.type, self.bf16):
                result = self.model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                             generation_config=settings)
            out.append(self.tokenizer.decode(result[0, len(ids):], skip_special_tokens=True))
        return out

    # -- files -----------------------------------------------------------------------------
    def predict_file(self, path: str, format: str = "auto", max_new_tokens: int = 50) -> list[dict]:
        """One row per document of `path`: mlm -> text, filled, top (candidates per mask);
        causal_lm -> prompt, generated."""
        from tunelab.data.corpus import read_documents

        texts = [d.text for d in read_documents(path, format, self.config.data.text_column,
                                                self.task.settings.document_separator)
                 if d.text.strip()]
        if self.task.name == "mlm":
            return [{"text": r["text"], "filled": r["filled"],
                     "top": " ; ".join(" | ".join(f"{c['token']} {c['score']:.3f}" for c in m)
                                       for m in r["masks"])}
                    for r in self.fill_mask(texts)]
        return [{"prompt": t, "generated": g}
                for t, g in zip(texts, self.generate(texts, max_new_tokens))]
