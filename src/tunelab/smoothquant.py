"""SmoothQuant for the int8 export: move activation outliers into the weights before dynamic
quantisation (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", arXiv 2211.10438).

Dynamic int8 quantisation gives each activation matrix one scale. Transformer hidden states
carry a few channels hundreds of times larger than the rest, so that one scale leaves the other
channels with a handful of levels: on a MiniLM LoRA run, 1.8% of SST-2 test predictions flipped
against fp32. For every Linear, with per-input-channel maxima |X_j| measured on calibration
texts,

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)        y = (x / s) @ (diag(s) W)^T + b

is the same function in exact arithmetic; x / s has its outliers flattened and the weights, which
get one int8 scale per output channel, absorb them. BERT's LayerNorm feeds the residual stream
too, so the division cannot be folded into it as in pre-LayerNorm LLMs: it stays an explicit
element-wise multiply before each MatMul (cheap next to the MatMul it protects).
"""
from __future__ import annotations

import torch

ALPHA = 0.5
"""Migration strength: 0.5 balances activation and weight ranges (the paper's default for
BERT-sized models)."""


class SmoothedLinear(torch.nn.Module):
    """``linear`` computing ``(x * inv_scale) @ (W * scale)^T + b``."""

    def __init__(self, linear: torch.nn.Linear, scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        with torch.no_grad():
            linear.weight.mul_(scale.to(linear.weight.dtype))
        self.register_buffer("inv_scale", (1.0 / scale).to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)


def input_maxima(model: torch.nn.Module, batches, skip=()) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every nn.Linear (names in ``skip`` and their children
    excluded) over the model inputs in ``batches`` (dicts of tensors)."""
    maxima: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name):
        def hook(_module, args):
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            maxima[name] = torch.maximum(maxima[name], amax) if name in maxima else amax
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not _skipped(name, skip):
            hooks.append(module.register_forward_pre_hook(record(name)))
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return maxima


def smooth(model: torch.nn.Module, maxima: dict[str, torch.Tensor],
           alpha: float = ALPHA) -> int:
    """Replace each measured Linear of ``model`` by its SmoothedLinear, in place; returns how
    many were replaced. The model computes the same function (up to rounding)."""
    replaced = 0
    for name, amax in maxima.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        wmax = linear.weight.detach().abs().amax(0).float()
        scale = (amax.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha))
        scale = scale.clamp(min=1e-2, max=1e2)  # a dead channel must not blow a weight up
        setattr(parent, child, SmoothedLinear(linear, scale))
        replaced += 1
    return replaced


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)
