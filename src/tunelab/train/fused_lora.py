"""LoRA linear layers in one autograd node: fewer kernels and casts for the same update.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: under bf16
autocast that is the frozen weight cast to bf16 again at every forward, four linear layers'
worth of autograd nodes, a multiplication and an addition over the whole output, and in the
backward the same again plus casts of each gradient. On a MiniLM LoRA step (CPU, batch 32)
those element-wise passes and casts were ~15% of the step, next to matmuls of rank 8.

`use_fused_lora(model)` gives each plain LoRA linear layer (one adapter, no dropout, no DoRA or
other variant, an unmerged `nn.Linear` base with a frozen weight) a forward that computes

    h = x @ A.T                      y = x @ W.T + b,  then  y += h @ (s * B).T

with W cast once and kept while it is unchanged (it is frozen; tunelab.train.frozen), and the
backward

    g = dY @ (s * B)   dX = dY @ W + g @ A   dA = g.T @ x   dB = s * dY.T @ h

The same function, rounded once per matmul (the addition of the update happens inside the
matmul's accumulation): results match PEFT's to bf16 rounding and exactly in exact arithmetic.
Any call outside those conditions (adapters disabled or merged, another adapter active,
extra arguments) goes through PEFT's own forward.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from tunelab.train.frozen import CachedCastLinear, autocast_dtype, cached_cast


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a = lora_a.to(dtype)
        sb = (lora_b * scaling).to(dtype)
        h = x2 @ a.t()
        if bias is not None:
            y = torch.addmm(bias.to(dtype), x2, weight.t())
        else:
            y = x2 @ weight.t()
        y.addmm_(h, sb.t())
        ctx.save_for_backward(x2, h, weight, a, sb)
        ctx.scaling = scaling
        ctx.input_dtype = x.dtype
        ctx.shape = shape
        ctx.bias_meta = None if bias is None else bias.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, weight, a, sb = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gb = g2 @ sb  # dY @ (s B): the gradient reaching the rank-r activations
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).addmm_(gb, a).view(ctx.shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0).to(ctx.bias_meta)
        if ctx.needs_input_grad[3]:
            grad_a = gb.t() @ x2
        if ctx.needs_input_grad[4]:
            grad_b = (g2.t() @ h).mul_(ctx.scaling)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


@functools.cache
def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        """PEFT's LoRA `Linear`, with `forward` computed by one autograd node when it can."""

        def forward(self, x, *args, **kwargs):
            name = self._fused_adapter
            if (args or kwargs or self.disable_adapters or self.merged
                    or list(self.active_adapters) != [name]
                    or self.base_layer.weight.requires_grad):
                return super().forward(x, *args, **kwargs)
            base = self.base_layer
            dtype = autocast_dtype(x) or x.dtype
            return _LoraLinearFunction.apply(
                x, cached_cast(self, base.weight, dtype), base.bias, self.lora_A[name].weight,
                self.lora_B[name].weight, self.scaling[name], dtype)

    FusedLoraLinear.__module__ = __name__  # pickles by reference, via __getattr__ below
    FusedLoraLinear.__qualname__ = "FusedLoraLinear"
    return FusedLoraLinear


def __getattr__(name: str):
    if name == "FusedLoraLinear":
        return _lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fusable(layer) -> str | None:
    """The adapter name when `layer` is a plain PEFT LoRA linear layer this module computes
    the same way; None otherwise."""
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or type(layer.get_base_layer()) not in (nn.Linear,
                                                                          CachedCastLinear):
        return None
    if layer.base_layer is not layer.get_base_layer() or layer.fan_in_fan_out:
        return None
    if len(layer.lora_A) != 1 or layer.lora_variant or layer.base_layer.weight.requires_grad:
        return None
    (name,) = layer.lora_A.keys()
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    if layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None:
        return None
    return name


def use_fused_lora(model: nn.Module) -> int:
    """Switch every fusable LoRA linear layer of `model` to the fused forward (in place; the
    parameters, their names and the saved adapter stay PEFT's). Returns how many switched."""
    fused_class = None
    count = 0
    for module in model.modules():
        name = fusable(module)
        if name is None:
            continue
        fused_class = fused_class or _lora_linear_class()
        module.__class__ = fused_class
        module._fused_adapter = name
        count += 1
    return count
