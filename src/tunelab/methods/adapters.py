"""Bottleneck adapters: a small down-projection, nonlinearity and up-projection with a residual
connection, inserted after transformer sublayers. Two placements are registered:

- adapter_houlsby: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
  arXiv 1902.00751. Two adapters per layer, after the attention output projection and after the
  feed-forward output projection; the LayerNorms train too (as in the paper).
- adapter_pfeiffer: Pfeiffer et al. 2020, "AdapterFusion: Non-Destructive Task Composition for
  Transfer Learning", arXiv 2005.00247. One adapter per layer, after the feed-forward output.

Trains: the adapters, the LayerNorms where set, and the task head. Saves: those parameters
only. Mergeable: no (the adapter is nonlinear).

Written by hand: PEFT has no bottleneck adapters (PEFT issue #244) and AdapterHub's `adapters`
pins an old transformers. An adapter wraps the sublayer's output projection (BERT
`attention.output.dense` / `output.dense`, MPNet `attention.attn.o` / `output.dense`, Llama
`o_proj` / `down_proj`), so it acts on the sublayer output before the residual add and
LayerNorm, where the paper puts it. The up-projection starts at zero: at init every adapter is
the identity and the model equals the base model.
"""
import re
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.registry import (ALL_TASKS, MethodSettings, register_method,
                                      set_head_trainable)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}

# Output projections of the attention and feed-forward sublayers, per family.
ATTENTION_OUTPUT = {"encoder": r".*\.attention\.output\.dense", "mpnet": r".*\.attention\.attn\.o",
                    "decoder": r".*\.self_attn\.o_proj"}
FFN_OUTPUT = {"encoder": r".*\.layer\.\d+\.output\.dense",
              "mpnet": r".*\.layer\.\d+\.output\.dense", "decoder": r".*\.mlp\.down_proj"}


class Bottleneck(nn.Module):
    """x + up(act(down(x))), with `up` zero-initialised so that it starts as the identity."""

    def __init__(self, dim: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        # Houlsby's near-identity init: small down-projection, and here an exactly zero up.
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        return x + self.up(self.act(self.down(x)))


class AdaptedLinear(nn.Module):
    """A frozen output projection followed by its adapter."""

    def __init__(self, base: nn.Linear, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


@dataclass
class HoulsbySettings(MethodSettings):
    reduction_factor: int = 16
    """Hidden size / adapter bottleneck size (16: 384 -> 24 on MiniLM, 768 -> 48 on MPNet)."""
    activation: str = "swish"
    """Nonlinearity inside the adapter: relu, gelu, swish or tanh."""
    train_layer_norms: bool = True
    """Also train every LayerNorm (RMSNorm on decoders), as in the paper."""

    def __post_init__(self):
        check_settings(self)


@dataclass
class PfeifferSettings(MethodSettings):
    reduction_factor: int = 16
    """Hidden size / adapter bottleneck size (16: 384 -> 24 on MiniLM, 768 -> 48 on MPNet)."""
    activation: str = "relu"
    """Nonlinearity inside the adapter: relu, gelu, swish or tanh."""
    train_layer_norms: bool = False
    """Also train every LayerNorm (RMSNorm on decoders)."""

    def __post_init__(self):
        check_settings(self)


def check_settings(settings) -> None:
    if settings.reduction_factor < 1:
        raise ConfigError("method.reduction_factor must be at least 1")
    if settings.activation not in ACTIVATIONS:
        raise ConfigError(f"method.activation must be one of {', '.join(ACTIVATIONS)}; "
                          f"got {settings.activation!r}")


def insert_adapters(model: nn.Module, patterns: list[str], settings) -> int:
    """Wrap every Linear whose full name matches one of `patterns`; returns how many."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(re.fullmatch(p, n) for p in patterns)]
    for name in names:
        parent, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        dim = base.out_features
        adapter = Bottleneck(dim, max(1, dim // settings.reduction_factor), settings.activation)
        adapter.to(device=base.weight.device, dtype=base.weight.dtype)
        setattr(model.get_submodule(parent), child, AdaptedLinear(base, adapter))
    return len(names)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm",
                                                                               "RMSNorm"))


def apply_adapters(model, settings, ctx, patterns: list[str]):
    for p in model.parameters():
        p.requires_grad_(False)
    if not insert_adapters(model, patterns, settings):
        raise ConfigError(f"no linear layer of this model matches the adapter placement for "
                          f"{ctx.family} models ({' or '.join(patterns)}); Llama-style "
                          f"decoders are supported, fused GPT-2-style attention is not")
    for name, p in model.named_parameters():
        if ".adapter." in name:
            p.requires_grad_(True)
    if settings.train_layer_norms:
        for module in model.modules():
            if is_norm(module):
                module.requires_grad_(True)
    set_head_trainable(model, ctx.head_modules)
    return model


@register_method("adapter_houlsby", settings=HoulsbySettings, default_lr=1e-3, mergeable=False,
                 tasks=ALL_TASKS,
                 saves="adapter", paper="Houlsby et al. 2019, arXiv 1902.00751",
                 summary="bottleneck adapters after attention and feed-forward, + LayerNorms")
def apply_houlsby(model, settings, ctx):
    return apply_adapters(model, settings, ctx,
                          [ATTENTION_OUTPUT[ctx.family], FFN_OUTPUT[ctx.family]])


@register_method("adapter_pfeiffer", settings=PfeifferSettings, default_lr=1e-3,
                 tasks=ALL_TASKS,
                 mergeable=False, saves="adapter", paper="Pfeiffer et al. 2020, arXiv 2005.00247",
                 summary="one bottleneck adapter per layer after the feed-forward")
def apply_pfeiffer(model, settings, ctx):
    return apply_adapters(model, settings, ctx, [FFN_OUTPUT[ctx.family]])
