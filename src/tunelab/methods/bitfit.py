"""BitFit: train only the bias terms of the backbone (and the task head).

Paper: Ben Zaken, Ravfogel and Goldberg 2021, "BitFit: Simple Parameter-efficient Fine-tuning
for Transformer-based Masked Language-models", arXiv 2106.10199.
Trains: every parameter named `*.bias` (attention, feed-forward and LayerNorm biases, as in the
paper's code) plus the head. Saves: those parameters only (adapter/weights.safetensors).
Mergeable: trivially, the trained biases are the model's own parameters.

Written by hand: PEFT has no BitFit. Llama-style decoders have no bias terms at all, so the
method supports encoder families only (BitFit there would be a linear probe in disguise).
"""
from dataclasses import dataclass

from tunelab.errors import ConfigError
from tunelab.methods.registry import (MethodSettings, register_method,
                                      set_head_trainable)


@dataclass
class BitFitSettings(MethodSettings):
    pass


def merge(model):
    return model  # the biases live in the model's own modules: nothing to fold


@register_method("bitfit", settings=BitFitSettings, default_lr=1e-3, mergeable=True,
                 tasks=("classification", "token_classification", "mlm"),
                 saves="adapter", merge=merge, families=("encoder", "mpnet"),
                 paper="Ben Zaken et al. 2021, arXiv 2106.10199",
                 summary="bias terms only (+ head)")
def apply(model, settings, ctx):
    backbone_biases = 0
    for name, p in model.named_parameters():
        is_bias = name.endswith(".bias")
        p.requires_grad_(is_bias)
        backbone_biases += is_bias and not any(name.startswith(h + ".") for h in ctx.head_modules)
    if not backbone_biases:
        raise ConfigError("BitFit found no bias terms in this model; use lora or ia3 instead")
    set_head_trainable(model, ctx.head_modules)
    return model
