"""Prompt-based fine-tuning's settings and patterns: what `prompt:` in a recipe holds and
how a pattern splits into the text, the mask and the literal pieces around them
(tunelab.prompting trains and predicts with them)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tunelab.config import PRECISIONS, MethodConfig
from tunelab.errors import ConfigError

MLM_PATTERN = "{text} It was {mask}."
"""Default pattern of a masked LM (LM-BFF's SST-2 template)."""
CAUSAL_PATTERN = "Text: {text}\nLabel:"
"""Default pattern of a causal LM (zeroshot's default prompt)."""
FULL_LR = 2e-5
"""Learning rate for the whole LM (LM-BFF's grid is 1e-5 to 5e-5; PET uses 1e-5 for 250
steps on RoBERTa-large, a small LM takes more)."""


def _default_method() -> MethodConfig:
    from tunelab.config import build_method_config

    return build_method_config({"name": "full"})


@dataclass
class PromptSettings:
    patterns: list[str] = field(default_factory=list)
    """Patterns with {text} for the input. Masked LMs need {mask} once (where the verbaliser
    goes); causal LMs continue the pattern with the verbaliser (a {mask} may end the pattern to
    show where). Empty: one pattern, "{text} It was {mask}." (masked LM) or "Text: {text}\\n
    Label:" (causal LM). Several: one model each, probabilities averaged (PET's ensemble)."""
    verbalizers: dict[str, list[str]] | None = None
    """Label -> words that stand for it (positive: [great]). Unset: the verbalisers of
    fewshot-eval's --label-file, else the label names."""
    verbalizer_prefix: str = " "
    """Put before each verbaliser when it is tokenised: a space for English (the word as it
    appears after another word), "" for Chinese."""
    epochs: int = 30
    """Passes over the k x C examples (PET: 250 steps of 4 examples, about 30 epochs of 32)."""
    batch_size: int = 4
    """Examples per optimizer step (PET's 4: few examples need many small steps)."""
    lr: float | None = None
    """Peak learning rate. Unset: 2e-5 for the whole LM (method full), else the method's own
    rate (see `tunelab methods`: 5e-4 for lora)."""
    warmup_ratio: float = 0.0
    """Share of steps warming the learning rate up linearly; it then decays linearly to 0.
    None by default: the head is pretrained, so there is no random layer to protect."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorm weights)."""
    max_length: int = 256
    """Longest prompt in tokens. A masked LM's text is cut at its end (the pattern and the
    mask always stay); a causal LM's prompt is cut from the left (the cue is at its end)."""
    eval_batch_size: int = 32
    """Texts per forward pass when predicting."""
    seed: int = 42
    """Seed of the example order, dropout and new method weights (the same for every
    pattern: PET trains each pattern from the same start)."""
    method: MethodConfig = field(default_factory=_default_method)
    """How the LM is adapted: full (the default; fine for small masked LMs), or a registered
    method with its settings (prompt.method.name=lora, recommended for causal LMs)."""
    precision: str = "auto"
    """auto (bf16 autocast where the hardware has fast bf16, else fp32), bf16 or fp32. Runs
    on the GPU when there is one."""

    def __post_init__(self):
        for pattern in self.patterns:
            if pattern.count("{text}") != 1:
                raise ConfigError(f"prompt.patterns: {pattern!r} must contain {{text}} once")
            if pattern.count("{mask}") > 1:
                raise ConfigError(f"prompt.patterns: {pattern!r} has {{mask}} more than once")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"prompt.{name} must be positive")
        if self.max_length < 8:
            raise ConfigError("prompt.max_length must be at least 8")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError("prompt.lr must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("prompt.warmup_ratio must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"prompt.precision must be one of {', '.join(PRECISIONS)}; got "
                              f"{self.precision!r}")
        if self.verbalizers is not None:
            self.verbalizers = check_verbalizers(self.verbalizers)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["method"] = self.method.to_dict()
        return out


def check_verbalizers(value) -> dict[str, list[str]]:
    """label -> word or list of words, as {label: [words]}; ConfigError otherwise."""
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"prompt.verbalizers must map each label to a word or a list of "
                          f"words (positive: [great]), got {value!r}")
    out = {}
    for label, words in value.items():
        items = [words] if isinstance(words, str) else words
        if not isinstance(items, list) or not items or not all(
                isinstance(w, str) and w.strip() for w in items):
            raise ConfigError(f"prompt.verbalizers.{label} must be a non-empty word or list of "
                              f"non-empty words, got {words!r}")
        out[str(label)] = [w.strip() for w in items]
    return out


def prompt_settings(values: dict) -> PromptSettings:
    """From a plain dict (a recipe's `prompt:` section or prompt.* overrides)."""
    from tunelab.config import build_with_method

    values = dict(values)
    verbalizers = values.pop("verbalizers", None)
    settings = build_with_method(PromptSettings, values, "prompt")
    if verbalizers is not None:
        settings.verbalizers = check_verbalizers(verbalizers)
    return settings


# --------------------------------------------------------------------------------------------
# patterns


def split_pattern(pattern: str) -> list[str]:
    """"{text} It was {mask}." -> ["{text}", " It was", "{mask}", "."]. Spaces before {mask}
    go: the verbaliser prefix carries them (a BPE word token includes its space)."""
    parts, rest = [], pattern
    while rest:
        starts = [(rest.find(p), p) for p in ("{text}", "{mask}") if p in rest]
        if not starts:
            parts.append(rest)
            break
        at, placeholder = min(starts)
        literal = rest[:at]
        if placeholder == "{mask}":
            literal = literal.rstrip(" ")
        if literal:
            parts.append(literal)
        parts.append(placeholder)
        rest = rest[at + len(placeholder):]
    return parts


def causal_prompt(pattern: str) -> str:
    """A causal LM's prompt: the pattern without a final {mask} (the verbaliser follows)."""
    parts = split_pattern(pattern)
    if "{mask}" in parts[:-1]:
        raise ConfigError(f"prompt pattern {pattern!r}: a causal LM continues the prompt with "
                          "the verbaliser, so {mask} can only end the pattern")
    return "".join(p for p in parts if p != "{mask}")
