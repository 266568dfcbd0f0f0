"""Causal-LM scoring of label words: `LMScorer` (the zero-shot `lm` scorer: the log-probability of
each label's verbalisers after a prompt, batched and left-padded, averaged per token), contextual
calibration against content-free inputs (Zhao et al. 2021, arXiv 2102.09690), and the helpers
that tunelab.prompting shares to train through the same scores (`score_continuations`,
`left_pad`, `fit_prompt`, `log_mean_exp`); also `aggregate`, the max/mean over a label's
columns that every zero-shot scorer uses."""
from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING

import torch

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from tunelab.zeroshot import ZeroShotSettings

CONTENT_FREE = ("N/A", "", "[MASK]")
"""The content-free inputs whose label probabilities are averaged for calibration (the paper's
three)."""


def aggregate(values: torch.Tensor, groups: list[int], how: str) -> torch.Tensor:
    """(N, sum(groups)) -> (N, len(groups)): max or mean over each label's columns."""
    parts = torch.split(values, groups, dim=1)
    return torch.stack([p.amax(1) if how == "max" else p.mean(1) for p in parts], dim=1)


class LMScorer:
    """Log-probability of each label's verbalisers after the prompt, batched and left-padded
    (so that every continuation ends at the last position), optionally calibrated."""

    def __init__(self, model, tokenizer, verbalizers: list[list[str]], settings: ZeroShotSettings):
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.groups = [len(v) for v in verbalizers]
        flat = [v for group in verbalizers for v in group]
        self.continuations = [tokenizer(settings.verbalizer_prefix + v,
                                        add_special_tokens=False)["input_ids"] for v in flat]
        empty = [v for v, ids in zip(flat, self.continuations) if not ids]
        if empty:
            raise ConfigError(f"verbaliser {empty[0]!r} has no tokens")
        self._cf: torch.Tensor | None = None

    def verbalizer_log_probs(self, texts: list[str]) -> torch.Tensor:
        """(N, V) log p(verbaliser | prompt), per token when length_norm is set."""
        prompts = [self.settings.prompt.replace("{text}", t) for t in texts]
        prompt_ids = self.tokenizer(prompts)["input_ids"]
        if cache_argument(self.model):
            return score_prompts_in_batches(self.model, self.tokenizer, prompt_ids,
                                            self.continuations, self.settings.max_length,
                                            self.settings.length_norm, self.settings.batch_size)
        seqs = [(i, j) for i in range(len(prompts)) for j in range(len(self.continuations))]
        out = torch.empty(len(prompts), len(self.continuations))
        seqs.sort(key=lambda s: -(len(prompt_ids[s[0]]) + len(self.continuations[s[1]])))
        with torch.inference_mode():
            for start in range(0, len(seqs), self.settings.batch_size):
                batch = seqs[start:start + self.settings.batch_size]
                scores = self._score([prompt_ids[i] for i, _ in batch],
                                     [self.continuations[j] for _, j in batch])
                for (i, j), s in zip(batch, scores):
                    out[i, j] = s
        return out

    def _score(self, prompts: list[list[int]], conts: list[list[int]]) -> torch.Tensor:
        return score_continuations(self.model, self.tokenizer, prompts, conts,
                                   self.settings.max_length, self.settings.length_norm).cpu()

    def label_log_scores(self, texts: list[str]) -> torch.Tensor:
        """(N, L): each label's verbalisers combined: max, or log of the mean probability."""
        lp = self.verbalizer_log_probs(texts)
        if self.settings.aggregate == "max":
            return aggregate(lp, self.groups, "max")
        return log_mean_exp(lp, self.groups)

    def content_free(self) -> torch.Tensor:
        """(L,) label probabilities averaged over the content-free inputs."""
        if self._cf is None:
            self._cf = self.label_log_scores(list(CONTENT_FREE)).softmax(-1).mean(0)
        return self._cf

    def probabilities(self, texts: list[str]) -> torch.Tensor:
        probs = self.label_log_scores(texts).softmax(-1)
        return calibrate(probs, self.content_free()) if self.settings.calibrate else probs


def log_mean_exp(values: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """(N, sum(groups)) log-probabilities -> (N, len(groups)): the log of each group's mean
    probability (a label's verbalisers pooled; shared with tunelab.prompting)."""
    parts = torch.split(values, groups, dim=1)
    return torch.stack([p.logsumexp(1) - math.log(p.shape[1]) for p in parts], dim=1)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, position_ids), each (B, T), padded on the left so that every
    sequence ends at the last position; positions count from each sequence's first token."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def fit_prompt(tokenizer, prompt: list[int], room_for: int, max_length: int) -> list[int]:
    """The prompt, cut from the left (keeping a leading BOS) to leave `room_for` tokens."""
    if not prompt:  # an empty prompt would leave the first label token unpredicted
        prompt = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                  else tokenizer.eos_token_id]
    room = max_length - room_for
    if len(prompt) <= room:
        return prompt
    bos = tokenizer.bos_token_id
    head = prompt[:1] if bos is not None and prompt[0] == bos else []
    return head + prompt[len(prompt) - (room - len(head)):]


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM computes logits for the last positions only on request (a PEFT
    wrapper passes the argument through to the model it wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def score_continuations(model, tokenizer, prompts: list[list[int]], conts: list[list[int]],
                        max_length: int, length_norm: bool) -> torch.Tensor:
    """(B,) log p(cont | prompt) of each pair (per token when length_norm), batched and
    left-padded; on the model's device. Differentiable: tunelab.prompting trains
    through it."""
    seqs = [fit_prompt(tokenizer, p, len(c), max_length) + c for p, c in zip(prompts, conts)]
    tail = max(len(c) for c in conts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, mask, positions = left_pad(seqs, pad)
    extra = {"logits_to_keep": tail + 1} if accepts_logits_to_keep(model) else {}
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                   position_ids=positions.to(device), **extra).logits
    logp = logits[:, -(tail + 1):-1].float().log_softmax(-1)  # (B, tail, V)
    scores = []
    for row, c in enumerate(conts):
        steps = logp[row, tail - len(c):]  # the positions that predict c's tokens
        total = steps.gather(1, torch.tensor(c, device=device).unsqueeze(1)).sum()
        scores.append(total / len(c) if length_norm else total)
    return torch.stack(scores)


def cache_argument(model) -> str | None:
    """The name under which the causal LM takes (and returns) a key/value cache: `cache` in
    recent Transformers, `past_key_values` before; None without one (score_after_prompts
    needs it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def score_prompts_in_batches(model, tokenizer, prompts: list[list[int]],
                             conts: list[list[int]], max_length: int, length_norm: bool,
                             batch_size: int) -> torch.Tensor:
    """(N, V) score_after_prompts over batches of prompts, longest first (less padding). A
    batch holds about 4 x batch_size (prompt, continuation) rows: the prompts' cache is
    repeated once per continuation."""
    out = torch.empty(len(prompts), len(conts))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    step = batch_size if max(len(c) for c in conts) == 1 else \
        max(1, 4 * batch_size // len(conts))
    with torch.inference_mode():
        for start in range(0, len(order), step):
            idx = order[start:start + step]
            out[idx] = score_after_prompts(model, tokenizer, [prompts[i] for i in idx], conts,
                                           max_length, length_norm).cpu()
    return out


def score_after_prompts(model, tokenizer, prompts: list[list[int]], conts: list[list[int]],
                        max_length: int, length_norm: bool) -> torch.Tensor:
    """(B, V) log p(conts[j] | prompts[i]) (per token when length_norm) for every prompt and
    continuation: score_continuations over all B x V pairs, but each prompt runs once. Every
    continuation's first token is scored from the prompt's last logits; its later tokens run on
    the prompt's key/value cache, repeated once per continuation of two or more tokens (a
    one-token continuation needs no second pass). Each prompt is cut (fit_prompt) to leave
    room for the longest continuation."""
    tail = max(len(c) for c in conts)
    seqs = [fit_prompt(tokenizer, p, tail, max_length) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, mask, positions = left_pad(seqs, pad)  # (B, T) each
    device = next(model.parameters()).device
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), use_cache=tail > 1, **extra)
    first = out.logits[:, -1].float().log_softmax(-1)  # (B, vocab): predicts each first token
    scores = first[:, torch.tensor([c[0] for c in conts], device=device)]  # (B, V)
    longer = [j for j, c in enumerate(conts) if len(c) > 1]  # the others are scored already
    if longer:
        n, v, width = len(seqs), len(longer), tail - 1
        inputs = torch.full((v, width), pad, dtype=torch.long)  # c[:-1] predicts c[1:]
        targets = torch.zeros((v, width), dtype=torch.long)
        real = torch.zeros((v, width), dtype=torch.long)
        for row, j in enumerate(longer):
            c = conts[j]
            inputs[row, :len(c) - 1], targets[row, :len(c) - 1] = torch.tensor(c[:-1]), \
                torch.tensor(c[1:])
            real[row, :len(c) - 1] = 1
        name = cache_argument(model)
        cache = getattr(out, name)
        cache.batch_repeat_interleave(v)  # row i * v + k: prompt i, continuation longer[k]
        rows_mask = torch.cat([mask.repeat_interleave(v, 0), real.repeat(n, 1)], 1)
        rows_pos = positions[:, -1:].repeat_interleave(v, 0) + 1 + torch.arange(width)
        logits = model(input_ids=inputs.repeat(n, 1).to(device),
                       attention_mask=rows_mask.to(device), position_ids=rows_pos.to(device),
                       **{name: cache}).logits  # (B * v, width, vocab)
        later = logits.float().log_softmax(-1).gather(
            2, targets.repeat(n, 1).unsqueeze(2).to(device)).squeeze(2)
        rest = torch.zeros_like(scores)
        rest[:, longer] = (later * real.repeat(n, 1).to(device)).sum(1).view(n, v)
        scores = scores + rest
    if length_norm:
        scores = scores / torch.tensor([len(c) for c in conts], device=device)
    return scores


def calibrate(probs: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Contextual calibration: W = diag(p_cf)^-1, b = 0, then renormalise (Zhao et al. 2021)."""
    scaled = probs / content_free.clamp(min=1e-12)
    return scaled / scaled.sum(-1, keepdim=True)
