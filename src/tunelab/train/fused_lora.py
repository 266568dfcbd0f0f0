"""LoRA layers whose update goes into the frozen layer's output inside one matmul.

PEFT computes a LoRA linear as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the scaling
multiplies and the sum adds activation-sized tensors ([tokens, out_features]) in two more
passes forward and one more backward, in every adapted layer. `FusedLinear` scales the
rank-sized tensor instead (`lora_A`'s output, [tokens, r]) and lets `torch.addmm` add
`lora_B`'s product into the base output as it computes it: the same function (the scaling is
linear), rounded once where PEFT rounds three times under bf16. On a MiniLM LoRA step the two
passes were 4% of the time. Under autocast the input is cast to bf16 once for both matmuls,
where autocast casts it for each (casts and copies: 11.3% -> 7.8% of a LoRA step; the two
input gradients then add in bf16 before the cast back).

Only the plain case takes the fused path: one active LoRA adapter without a variant (DoRA
...), not merged, adapters enabled, no per-row `adapter_names`; anything else is PEFT's own
forward. Weights, state dicts, saved adapters and merging are PEFT's, untouched. Not under
DeepSpeed: ZeRO-3 gathers a weight when its own module runs, and the fused layer reads
`lora_B`'s weight without running it (FSDP gathers a whole layer's weights before it runs).
"""
from __future__ import annotations

from functools import cache

import torch
from torch import nn

from tunelab.train.frozen import autocast_dtype


class _Fused:
    """Put before PEFT's `lora.Linear` in the class `fused_class` makes."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self._plain():
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        dtype = autocast_dtype(x)
        if dtype is not None:  # cast once for both matmuls: autocast would cast x for each
            x = x.to(dtype)
        result = self.base_layer(x)
        if dtype is None:
            x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
        low = self.lora_A[name](self.lora_dropout[name](x)) * self.scaling[name]
        # a bf16 base with fp32 adapters (no autocast) sums in fp32, as PEFT's `+` promotes
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(low.dtype),
                          low.reshape(-1, low.shape[-1]), self.lora_B[name].weight.t())
        return out.view(result.shape).to(result.dtype)

    def _plain(self) -> bool:
        adapters = self.active_adapters
        if self.disable_adapters or self.merged or len(adapters) != 1:
            return False
        name = adapters[0]
        return (name in self.lora_A and name not in getattr(self, "lora_variant", {})
                and self.lora_B[name].bias is None)  # lora_bias: PEFT scales the bias too


@cache
def fused_class() -> type:
    from peft.tuners.lora.layer import Linear

    return type("FusedLinear", (_Fused, Linear), {})


def fuse_lora_layers(model: nn.Module) -> int:
    """Switch every PEFT `lora.Linear` of `model` (exactly that class) to its fused form, in
    place; the number switched."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = fused_class()
            count += 1
    return count
