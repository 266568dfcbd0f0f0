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

Where the base layer is a frozen `nn.Linear` and the LoRA dropout is off (the default), the
whole layer is one autograd function, `LoraLinearFunction`, with its backward written out: the
input gradient in one matmul and one `addmm_` into it (no separate activation-sized sum), and
the rank-sized products as `[r, tokens]` matmuls, the faster orientation on CPU (2.5-3% and 4%
of a MiniLM LoRA step). On CPU in bf16 the frozen weight comes laid out for oneDNN in advance
(`frozen.packed_weights`: 3.2-4.0% of a LoRA step). With LoRA dropout the layer is `addmm` as
above.

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

from tunelab.train import frozen
from tunelab.train.frozen import (CachedCastLinear, autocast_dtype, cached_cast, grouped_output,
                                  linear_packed, linear_packed_add, packed_weights)


class LoraLinearFunction(torch.autograd.Function):
    """`x W^T + b + (s x A^T) B^T` for a 2-D `x`, a frozen `W` and `b`, one dtype throughout,
    with the backward written out: the input gradient `g W + (s g B) A` is one matmul and one
    `addmm_` into it, where autograd adds the base's and the adapter's input gradients in
    another activation-sized pass; the update goes into the base output in place (an
    out-of-place `addmm` first copies the base output). `packed`: the frozen weight laid out
    for oneDNN (`frozen.packed_weights`), used in place of `weight` on CPU in bf16."""

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_a, lora_b, scaling, packed=None):
        out, low_t = lora_linear(x2, weight, bias, lora_a, lora_b, scaling, packed)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, low_t)
        ctx.scaling, ctx.packed = scaling, packed
        return out

    @staticmethod
    def backward(ctx, g):
        # the rank-sized products are formed as [r, tokens] x [tokens, n]: the other way round
        # (`g^T low`, [n, tokens] x [tokens, r]) took 1.8x as long at MiniLM's shapes
        x2, weight, lora_a, lora_b, low_t = ctx.saved_tensors
        g_low_t = torch.mm(lora_b.t(), g.t()).mul_(ctx.scaling)  # the gradient of low, [r, T]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, weight) if ctx.packed is None \
                else linear_packed(g, ctx.packed.transposed())
            dx.addmm_(g_low_t.t(), lora_a)
        d_a = torch.mm(g_low_t, x2) if ctx.needs_input_grad[3] else None
        d_b = torch.mm(low_t, g).t() if ctx.needs_input_grad[4] else None
        return dx, None, None, d_a, d_b, None, None


def lora_linear(x2, weight, bias, lora_a, lora_b, scaling, packed=None):
    """`LoraLinearFunction`'s forward without autograd: the output and `(s x A^T)^T`."""
    low_t = torch.mm(lora_a, x2.t()).mul_(scaling)  # (s x A^T)^T: [r, tokens]
    if packed is not None:  # the weight laid out for oneDNN in advance (`packed_weights`)
        out = linear_packed(x2, packed.matrix, bias)
    else:
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    out.addmm_(low_t.t(), lora_b.t())
    return out, low_t


class _Fused:
    """Put before PEFT's `lora.Linear` in the class `fused_class` makes."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self.__dict__.get("_plan")  # prediction: `LoraPlan`
        if plan is not None and not args and not kwargs and not torch.is_grad_enabled() \
                and (out := plan.output(self, x)) is not None:
            return out
        if args or kwargs or not self._plain():
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        dtype = autocast_dtype(x)
        if self._one_function(name, x.dtype if dtype is None else None):
            return self._lora_linear(x, name, dtype)
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

    def _lora_linear(self, x: torch.Tensor, name: str, dtype: torch.dtype | None):
        if dtype is not None and (out := grouped_output(self, x, dtype)) is not None:
            return out
        base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
        weight, bias = base.weight, base.bias
        packed = None
        if dtype is not None:  # the casts autocast would make (frozen weights' kept)
            x = x.to(dtype)
            a = cached_cast(self.lora_A[name], a, dtype)  # kept where frozen (prediction)
            b = cached_cast(self.lora_B[name], b, dtype)
            bias = None if bias is None else bias.to(dtype)
            if not isinstance(base, CachedCastLinear):
                weight = weight.to(dtype)
            elif (packed := packed_weights(base, weight, dtype)) is not None:
                weight = None  # the function takes the packed form instead
            else:
                weight = cached_cast(base, weight, dtype)
        args = (x.reshape(-1, x.shape[-1]), weight, bias, a, b, self.scaling[name], packed)
        # prediction builds no graph: none of autograd.Function's bookkeeping (a short sentence
        # with the adapter unmerged: 10.6 -> 10.3 ms)
        out = LoraLinearFunction.apply(*args) if torch.is_grad_enabled() else lora_linear(*args)[0]
        return out.view(*x.shape[:-1], out.shape[-1])  # a view made outside the function

    def _one_function(self, name: str, uncast: torch.dtype | None) -> bool:
        """Whether `LoraLinearFunction` computes this layer: a frozen `nn.Linear` base, no
        LoRA dropout, and without autocast (`uncast`: the input's dtype) every tensor in the
        input's dtype; under autocast (`uncast` None) the casts make them one."""
        base = self.base_layer
        if not isinstance(base, nn.Linear) or self.fan_in_fan_out \
                or not isinstance(self.lora_dropout[name], nn.Identity):
            return False
        frozen = [base.weight] + ([] if base.bias is None else [base.bias])
        if any(t.requires_grad for t in frozen):
            return False
        tensors = frozen + [self.lora_A[name].weight, self.lora_B[name].weight]
        return uncast is None or all(t.dtype == uncast for t in tensors)

    def _plain(self) -> bool:
        adapters = self.active_adapters
        if self.disable_adapters or self.merged or len(adapters) != 1:
            return False
        name = adapters[0]
        return (name in self.lora_A and name not in getattr(self, "lora_variant", {})
                and self.lora_B[name].bias is None)  # lora_bias: PEFT scales the bias too


SUM_ROWS = 256
"""Up to this many rows a kept-apart LoRA layer adds its update in the matmul's sum post-op."""


class LoraPlan(frozen.Uncopied):
    """A frozen plain LoRA layer's prediction (grad off, bf16 autocast, CPU) with everything
    prepared once: the frozen base laid out for oneDNN (`frozen.packed_weights`, shared with
    every model over the same weights), A laid out and B cast and laid out in bf16 (its update
    added in the matmul's sum post-op for a few rows), called without the checks and
    casts of the general path (~70 us a layer in Python: a fifth of a short sentence kept
    apart); or, folded (`fold`), `W + (B A) s` computed as PEFT merges it, cast and laid out
    once, so that the layer is one matmul as in a merged model while the module keeps PEFT's
    form and its frozen `W` (which `tunelab serve` shares between runs) untouched: it then
    holds the merged weight's size in its `dtype` (`nbytes`): bf16 under autocast, or fp32
    for prediction without it (folded only). Made again when a tensor it was made
    from is written or another adapter is active; a trained tensor (its in-place updates may
    not bump the version), disabled or merged adapters, or another dtype or device take the
    general path."""

    def __init__(self, layer: nn.Module, fold: bool, dtype: torch.dtype = torch.bfloat16):
        if dtype != torch.bfloat16 and not fold:
            raise ValueError("a LoRA layer kept apart is planned in bf16 only")
        self.fold, self.dtype, self.key = fold, dtype, None
        self._make(layer, _plan_key(layer))

    def _make(self, layer: nn.Module, key: tuple) -> None:
        base, name = layer.base_layer, key[0]
        self.key, self.scaling = key, layer.scaling[name]
        self.bias = None if base.bias is None else base.bias.detach().to(self.dtype)
        if self.fold:
            self.matrix = frozen.laid_out(folded_weight(layer, name), self.dtype)
            self.packed = self.a = self.b = None
        else:  # the base's layout is taken at the first call: a run folded next makes none
            self.matrix = self.packed = None
            self.a = frozen.laid_out(layer.lora_A[name].weight, torch.bfloat16)
            self.b = cached_cast(layer.lora_B[name], layer.lora_B[name].weight, torch.bfloat16)
            self.b_laid = frozen.laid_out(self.b, torch.bfloat16)

    @property
    def nbytes(self) -> int:
        if self.matrix is None:
            return 0
        return torch.finfo(self.dtype).bits // 8 * self.matrix.shape[0] * self.matrix.shape[1]

    def current(self, layer: nn.Module) -> bool:
        """Whether the plan applies to `layer` as it is now, made again first if a tensor it
        was made from was written or another adapter is active (or its fold was released)."""
        key = _plan_key(layer)
        if key is None:
            return False
        if key != self.key or (self.matrix if self.fold else self.a) is None:
            self._make(layer, key)
        return True

    def release(self) -> None:
        """Drop what was laid out (the fold's matrix, or A and B kept apart: a layer plan holds
        them stacked with its siblings'); made again if the layer is called on its own."""
        self.matrix = self.a = self.b_laid = None

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output for `x`, or None where the plan does not apply now."""
        dtype = autocast_dtype(x) or (torch.float32 if x.dtype == torch.float32 else None)
        if x.device.type != "cpu" or dtype != self.dtype or not self.current(layer):
            return None
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        if self.matrix is not None:
            out = linear_packed(x2, self.matrix, self.bias)
        else:
            if self.packed is None:
                self.packed = packed_weights(layer.base_layer, layer.base_layer.weight,
                                             torch.bfloat16)
            # lora_linear's forward with A laid out too, and for a few rows the update added in
            # the matmul's sum post-op (for many, its fresh output costs more than addmm_ in
            # place): the same values; one short sentence through MiniLM with the adapter kept
            # apart 8.6-10.6 -> 7.6-8.7 ms (paired, three rounds), 640 sentences unchanged
            low = linear_packed(x2, self.a).mul_(self.scaling)
            out = linear_packed(x2, self.packed.matrix, self.bias)
            out = linear_packed_add(low, self.b_laid, out) if x2.shape[0] <= SUM_ROWS \
                else out.addmm_(low, self.b.t())
        return out.view(*x.shape[:-1], out.shape[-1])


def folded_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """`W + (B A) s` for adapter `name` of LoRA layer `layer`, as PEFT merges it, in W's dtype."""
    base = layer.base_layer
    # made inside a forward too: not under its autocast (B A would be a bf16 matmul)
    with torch.no_grad(), torch.autocast(base.weight.device.type, enabled=False):
        return base.weight + layer.get_delta_weight(name).to(base.weight.dtype)


def _plan_key(layer: nn.Module) -> tuple | None:
    """What a plan was made from: the one active adapter, its scaling and every tensor's memory
    and version; None when adapters are disabled or merged, several are active or a tensor is
    trained. (Read from the modules' own dicts: through `nn.Module.__getattr__` this was a
    tenth of a short sentence's time, folded.)"""
    if layer.disable_adapters or layer.merged_adapters:
        return None
    name = layer.active_adapter
    if not isinstance(name, str):
        if len(name) != 1:
            return None
        name = name[0]
    modules = layer._modules
    base = modules["base_layer"]._parameters
    tensors = (base["weight"], base.get("bias"),
               modules["lora_A"]._modules[name]._parameters["weight"],
               modules["lora_B"]._modules[name]._parameters["weight"])
    if any(t is not None and t.requires_grad for t in tensors):
        return None
    return name, layer.scaling[name], *((None, None) if t is None else (t.data_ptr(), t._version)
                                        for t in tensors)


def plan_lora_layers(model: nn.Module, fold: bool = False,
                     dtype: torch.dtype = torch.bfloat16) -> int:
    """Give every fused LoRA layer of `model` that computes one plain frozen adapter in one
    function (`_one_function`) its `LoraPlan`, where the packed path in `dtype` is there (CPU);
    `fold`: folded (or back to kept apart, `fold=False`: bf16 only). Returns the bytes the
    folds hold."""
    total = 0
    if not frozen.PACK_WEIGHTS or not frozen.can_pack(dtype):
        return total
    for module in model.modules():
        if type(module) is not fused_class() or not module._plain() \
                or not module._one_function(module.active_adapters[0], None) \
                or module.base_layer.weight.device.type != "cpu" or _plan_key(module) is None:
            continue
        plan = module.__dict__.get("_plan")
        if plan is None or plan.fold != fold or plan.dtype != dtype:
            plan = module.__dict__["_plan"] = LoraPlan(module, fold, dtype)
        total += plan.nbytes
    return total


def fold_lora_layers(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """`plan_lora_layers(model, fold=True)`, folded in `dtype` (bf16 for prediction under
    autocast, fp32 without): the bytes the folds hold."""
    return plan_lora_layers(model, fold=True, dtype=dtype)


def unfold_lora_layers(model: nn.Module, plan: bool = True) -> int:
    """Back to the adapters kept apart (planned where bf16's path is there and `plan`: a model
    predicting in fp32 has no use for the bf16 plans); how many layers were folded."""
    folded = 0
    for module in model.modules():
        if getattr(module.__dict__.get("_plan"), "fold", False):
            del module.__dict__["_plan"]
            folded += 1
    if plan:
        plan_lora_layers(model, fold=False)
    return folded


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
