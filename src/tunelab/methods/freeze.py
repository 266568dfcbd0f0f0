"""Freeze the backbone: train the task head only (a linear probe), or the head plus the top
N transformer layers.

Paper: feature-based transfer / linear probing (Peters et al. 2019, "To Tune or Not to Tune?",
arXiv 1903.05987). Trains: the head, plus the last `train_layers` layers. Saves: only the
trained parameters (adapter/weights.safetensors); the frozen backbone is the base model.
"""
import re
from dataclasses import dataclass

from tunelab.errors import ConfigError
from tunelab.methods.registry import MethodSettings, register_method, set_head_trainable


@dataclass
class FreezeSettings(MethodSettings):
    train_layers: int = 0
    """Also train the last N transformer layers (0 = linear probe on frozen features)."""

    def __post_init__(self):
        if self.train_layers < 0:
            raise ConfigError("method.train_layers must be >= 0")


_LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


def layer_index(param_name: str) -> int | None:
    """Index of the transformer layer a parameter belongs to, or None (embeddings, head)."""
    m = _LAYER.search(param_name)
    return int(m.group(1)) if m else None


@register_method("freeze", settings=FreezeSettings, default_lr=1e-3, mergeable=True,
                 tasks=("classification", "token_classification", "mlm"),
                 saves="adapter", paper="Peters et al. 2019, arXiv 1903.05987",
                 summary="head only (linear probe), or head + last N layers")
def apply(model, settings, ctx):
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.train_layers:
        indices = {layer_index(n) for n, _ in model.named_parameters()} - {None}
        if not indices:
            raise ConfigError("method.train_layers is set but no numbered layers were found")
        keep = set(sorted(indices)[-settings.train_layers:])
        for name, p in model.named_parameters():
            if layer_index(name) in keep:
                p.requires_grad_(True)
    set_head_trainable(model, ctx.head_modules)
    return model
