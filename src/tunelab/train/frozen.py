"""Frozen weights cast to the autocast dtype once, not at every forward.

Autocast keeps the bf16 copy of a weight for the rest of its context only when the weight
requires gradients; a frozen weight (LoRA's backbone, a linear probe's encoder, a causal LM's
262k-row output layer under prompt-based training) is cast again at every call. On
Gemma-3-270M + LoRA, casting the tied 262,144 x 640 output layer was 200 ms of a 2.3 s
prompt-based step. `cache_frozen_casts(model)` makes each plain `nn.Linear` with a frozen
weight keep its cast copy while the weight is unchanged: the same values autocast would make,
so outputs and gradients are bit-identical. The copy is not a buffer (never saved) and costs
the weight's size in the autocast dtype; training under FSDP or DeepSpeed skips it (each
process would keep whole copies of weights the engine shards).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def cached_cast(module: nn.Module, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.detach().to(dtype)`, kept on `module` until `tensor` changes (in-place updates
    and loads bump its version) or another dtype is asked for."""
    key = (dtype, tensor._version, tensor.data_ptr())
    cached = module.__dict__.get("_cast_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad(), torch.inference_mode(False):  # usable by autograd later
            cached = (key, tensor.detach().to(dtype))
        module.__dict__["_cast_cache"] = cached
    return cached[1]


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class CachedCastLinear(nn.Linear):
    """`nn.Linear` that, under autocast with a frozen weight, reuses its cast weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(x)
        if dtype is None or self.weight.requires_grad:
            return super().forward(x)
        # autocast casts x and the bias as it would have; the weight is already cast
        return F.linear(x, cached_cast(self, self.weight, dtype), self.bias)


def cache_frozen_casts(model: nn.Module) -> int:
    """Switch every plain `nn.Linear` of `model` whose weight is frozen now to
    `CachedCastLinear` (in place; a weight unfrozen later is simply not cached). Returns how
    many switched."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.__class__ = CachedCastLinear
            count += 1
    return count
