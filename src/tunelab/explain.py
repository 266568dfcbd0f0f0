"""Token attributions for a classification run: which words pushed the prediction, and how far.

    >>> from tunelab.explain import explain
    >>> [e] = explain(tunelab.load("runs/sst2-lora"), ["a gripping, beautiful film"])
    >>> e.label, e.top(2)
    ('positive', [('beautiful', 1.92), ('gripping', 0.71)])

Methods (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks", arXiv 1703.01365):
- `ig`  integrated gradients: the gradient of the label's logit, averaged along the straight
  path from a baseline input to the real one, times (input - baseline). The baseline is the
  same text with every word token replaced by the pad token; special tokens ([CLS], [SEP], ...)
  are kept, so they score 0 and the scores tell only what the words add. Completeness: the
  scores sum to logit(text) - logit(baseline); `delta` is how far the numeric integral
  (`steps` points) misses that sum, and a large |delta| means: use more steps.
- `gxi` gradient x input: one backward pass, the gradient of the logit times the embedding.
  Cheap and local (no completeness), good for a quick look.

Both act on the output of the model's word-embedding module (`get_input_embeddings()`, which
PEFT models pass through), fed back to the model as `inputs_embeds`; position and segment
embeddings are added inside the model as usual. This is captum's LayerIntegratedGradients on
the embedding layer, computed without the forward hook that class installs: a hook would be
seen by every other forward pass through the same module, such as the server's `/v1/classify`
requests running beside an explanation. Computation is fp32 (bf16 would swamp the completeness
check). Scores of sub-word tokens are summed into the words they came from.
"""
from __future__ import annotations

import html
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunelab.errors import ConfigError
from tunelab.io import atomic_write_bytes, atomic_write_json, atomic_write_text

METHODS = ("ig", "gxi")
IG_BATCH = 16
"""Interpolation points per forward pass: bounds memory on long texts and large models."""


@dataclass
class Explanation:
    """Why a run gave one text (or text pair) a label."""

    text: str
    pair: str | None
    label: str
    """The label explained: the predicted one unless another was asked for."""
    score: float
    """The model's probability of `label`."""
    predicted: str
    predicted_score: float
    method: str
    tokens: list[str]
    token_scores: list[float]
    """One per token, special tokens included (0 under `ig`: the baseline keeps them)."""
    words: list[str]
    word_scores: list[float]
    """Sum of the scores of each word's tokens; words as written in `text`."""
    pair_words: list[str] | None
    pair_scores: list[float] | None
    logit: float
    """Logit of `label` for the text."""
    baseline_logit: float | None
    """Logit of `label` for the baseline (`ig` only)."""
    delta: float | None
    """`ig`: sum of token scores - (logit - baseline_logit); near 0 when the integral converged."""
    truncated: bool
    """The input was longer than the run's max_length: words past it are not scored."""

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k words (of text and pair) with the largest absolute scores."""
        pairs = list(zip(self.words, self.word_scores))
        pairs += list(zip(self.pair_words or [], self.pair_scores or []))
        return sorted(pairs, key=lambda p: -abs(p[1]))[:k]

    def to_dict(self) -> dict:
        return asdict(self)


def explain(predictor, texts: list[str], pairs: list[str] | None = None, *,
            label: str | None = None, method: str = "ig", steps: int = 50) -> list[Explanation]:
    """Attributions for each text (and its pair) toward `label`, or the predicted label."""
    if isinstance(texts, str):
        raise TypeError("explain takes a list of texts; wrap a single text in a list")
    if method not in METHODS:
        raise ConfigError(f"unknown attribution method {method!r}; use ig (integrated "
                          "gradients) or gxi (gradient x input)")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    if label is not None and label not in predictor.labels:
        raise ConfigError(f"label {label!r} is not one of the run's labels: "
                          + ", ".join(predictor.labels))
    if pairs is not None and len(pairs) != len(texts):
        raise ConfigError(f"{len(pairs)} text pairs for {len(texts)} texts: give one per text")
    if not predictor.tokenizer.is_fast:
        raise ConfigError("explanations need a fast tokenizer (to map tokens back to words)")
    embeddings = word_embeddings(predictor.model)
    target = None if label is None else predictor.labels.index(label)
    return [_explain_one(predictor, embeddings, text, pairs[i] if pairs else None, target,
                         method, steps) for i, text in enumerate(texts)]


def word_embeddings(model) -> torch.nn.Module:
    """The module that turns token ids into word vectors, through any PEFT wrapper."""
    module = model.get_input_embeddings()
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{type(model).__name__} has no input-embedding module to attribute to")
    return module


def _explain_one(predictor, embeddings, text: str, pair: str | None, target: int | None,
                 method: str, steps: int) -> Explanation:
    model, tokenizer = predictor.model, predictor.tokenizer
    enc = tokenizer(text, pair, truncation=True, max_length=predictor.max_length,
                    return_tensors="pt", return_offsets_mapping=True)
    ids = enc["input_ids"].to(predictor.device)  # (1, T)
    extra = {k: enc[k].to(predictor.device) for k in ("attention_mask", "token_type_ids")
             if k in enc}
    # [UNK] counts as a word here: it stands for one the tokenizer could not spell
    keep = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    special = torch.tensor([i in keep for i in ids[0].tolist()], device=ids.device)
    baseline_ids = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))

    def forward(inputs_embeds):  # (S, T, H) -> (S, C) logits
        n = inputs_embeds.shape[0]
        return model(inputs_embeds=inputs_embeds,
                     **{k: v.expand(n, -1) for k, v in extra.items()}).logits.float()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x, base = embeddings(ids).float(), embeddings(baseline_ids).float()  # (1, T, H)
            logits, base_logits = forward(x)[0], forward(base)[0]  # (C,)
        chosen = int(logits.argmax()) if target is None else target
        scores, delta = _attribute(forward, x, base, chosen, method, steps)
    finally:
        model.train(was_training)
    probs = logits.softmax(-1)
    best = int(logits.argmax())
    words = _merge_words(enc, scores, text, pair)
    return Explanation(
        text=text, pair=pair, label=predictor.labels[chosen], score=float(probs[chosen]),
        predicted=predictor.labels[best], predicted_score=float(probs[best]), method=method,
        tokens=tokenizer.convert_ids_to_tokens(ids[0].tolist()),
        token_scores=[float(s) for s in scores], words=[w for w, _ in words[0]],
        word_scores=[s for _, s in words[0]],
        pair_words=[w for w, _ in words[1]] if pair is not None else None,
        pair_scores=[s for _, s in words[1]] if pair is not None else None,
        logit=float(logits[chosen]),
        baseline_logit=float(base_logits[chosen]) if method == "ig" else None, delta=delta,
        truncated=len(ids[0]) >= predictor.max_length)


def _attribute(forward, x: torch.Tensor, base: torch.Tensor, target: int, method: str,
               steps: int) -> tuple[torch.Tensor, float | None]:
    """(T,) score per token (summed over the embedding dimension) and the IG delta."""
    from captum.attr import InputXGradient, IntegratedGradients

    with torch.enable_grad():
        if method == "ig":
            attr, delta = IntegratedGradients(forward).attribute(
                x, baselines=base, target=target, n_steps=steps, internal_batch_size=IG_BATCH,
                return_convergence_delta=True)  # (1, T, H), (1,)
            return attr.sum(-1)[0].detach().cpu(), float(delta[0])
        attr = InputXGradient(forward).attribute(x.clone().requires_grad_(), target=target)
        return attr.sum(-1)[0].detach().cpu(), None


def _merge_words(enc, scores: torch.Tensor, text: str, pair: str | None):
    """([(word, score)] of the text, [(word, score)] of the pair): sub-word scores summed;
    each word is the span of `text` its tokens cover, so casing and accents stay as written."""
    groups: dict[tuple[int, int], list] = {}
    offsets = enc["offset_mapping"][0].tolist()
    for i, (segment, word) in enumerate(zip(enc.sequence_ids(0), enc.word_ids(0))):
        if word is None:  # special token
            continue
        start, end = offsets[i]
        group = groups.setdefault((segment, word), [start, end, 0.0])
        group[0], group[1] = min(group[0], start), max(group[1], end)
        group[2] += float(scores[i])
    out: tuple[list, list] = ([], [])
    for (segment, _), (start, end, score) in groups.items():
        source = text if segment == 0 else pair
        out[segment].append((source[start:end].strip() or source[start:end], score))
    return out


# --------------------------------------------------------------------------------------------
# presenting


def format_explanation(e: Explanation, top: int = 5) -> str:
    """Label, probability, every word with its score and the strongest words, as text."""
    head = f"{e.label} {e.score:.3f}"
    if e.label != e.predicted:
        head += f" (predicted: {e.predicted} {e.predicted_score:.3f})"
    if e.delta is not None:
        head += f"   ig delta {e.delta:+.2g} of {e.logit - e.baseline_logit:+.3f}"
    lines = [head, "  " + " ".join(f"{w}({s:+.3f})" for w, s in zip(e.words, e.word_scores))]
    if e.pair_words is not None:
        lines.append("  pair: " + " ".join(f"{w}({s:+.3f})"
                                           for w, s in zip(e.pair_words, e.pair_scores)))
    lines.append("  top: " + "  ".join(f"{w} {s:+.3f}" for w, s in e.top(top)))
    if e.truncated:
        lines.append("  (truncated at the run's max_length: later words are not scored)")
    return "\n".join(lines)


def _colour(score: float, scale: float) -> str:
    """Red for scores that push toward the label, blue for those against; stronger = darker."""
    alpha = min(1.0, abs(score) / scale) if scale > 0 else 0.0
    rgb = "220,38,38" if score > 0 else "37,99,235"
    return f"rgba({rgb},{alpha * 0.85:.3f})"


def _html_words(words: list[str], scores: list[float], scale: float) -> str:
    return " ".join(f'<span class="w" style="background:{_colour(s, scale)}" '
                    f'title="{s:+.4f}">{html.escape(w)}</span>' for w, s in zip(words, scores))


def explanations_html(explanations: list[Explanation], title: str = "") -> str:
    """One line per text: label and probability, then every word on its heat-map colour."""
    rows = []
    for e in explanations:
        scores = e.word_scores + (e.pair_scores or [])
        scale = max((abs(s) for s in scores), default=0.0)
        line = _html_words(e.words, e.word_scores, scale)
        if e.pair_words is not None:
            line += ' <span class="sep">&#8214;</span> ' + _html_words(e.pair_words,
                                                                       e.pair_scores, scale)
        head = f"{e.label} {e.score:.3f}"
        if e.label != e.predicted:
            head += f" (predicted: {e.predicted} {e.predicted_score:.3f})"
        rows.append(f'<p><span class="label">{html.escape(head)}</span> {line}</p>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title or "explanations")}</title>
<style>
body {{ font-family: sans-serif; line-height: 2.2; margin: 2em; }}
.w {{ padding: 2px 3px; border-radius: 3px; }}
.label {{ font-weight: bold; margin-right: 1em; }}
.legend {{ color: #555; }}
</style></head><body>
<h2>{html.escape(title or "explanations")}</h2>
<p class="legend"><span class="w" style="background:{_colour(1, 1)}">red</span> pushes toward
the label, <span class="w" style="background:{_colour(-1, 1)}">blue</span> against it; darker
means stronger (scaled per line). Hover a word for its score.</p>
{chr(10).join(rows)}
</body></html>
"""


def plot_explanation(e: Explanation, path, per_row: int = 8) -> None:
    """A PNG heat-map: the words in reading order on a grid, coloured blue-white-red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    words = e.words + (["||"] + e.pair_words if e.pair_words is not None else [])
    scores = e.word_scores + ([0.0] + e.pair_scores if e.pair_words is not None else [])
    rows = max(1, -(-len(words) // per_row))
    grid = np.full((rows, per_row), np.nan)
    grid.flat[:len(scores)] = scores
    scale = max((abs(s) for s in scores), default=0.0) or 1.0
    fig, ax = plt.subplots(figsize=(1.3 * per_row, 0.55 * rows + 0.9))
    ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-scale, vmax=scale,
              aspect="auto")
    for i, (word, score) in enumerate(zip(words, scores)):
        ax.text(i % per_row, i // per_row, f"{word[:14]}\n{score:+.2f}", ha="center",
                va="center", fontsize=8, color="white" if abs(score) > 0.6 * scale else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{e.label} {e.score:.3f} ({e.method}): red toward, blue against", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_explanations(explanations: list[Explanation], out, run: str = "",
                       steps: int | None = None) -> list[Path]:
    """explanations.json, explanations.html and explanation_<n>.png per text in `out`."""
    out = Path(out)
    atomic_write_json(out / "explanations.json", {
        "run": run, "steps": steps, "explanations": [e.to_dict() for e in explanations]})
    atomic_write_text(out / "explanations.html", explanations_html(explanations, run))
    paths = [out / "explanations.json", out / "explanations.html"]
    for i, e in enumerate(explanations, start=1):
        paths.append(out / f"explanation_{i:03d}.png")
        plot_explanation(e, paths[-1])
    return paths
