"""Frozen linear weights cast to the autocast dtype once, and on CPU laid out for the matmul
once, not at every call.

Autocast keeps the bf16 copy of a weight for the rest of its context only when the weight
requires gradients; a frozen weight (LoRA's backbone, a linear probe's encoder, a causal LM's
262k-row output layer under prompt-based training) is cast again at every call. On
Gemma-3-270M + LoRA, casting the tied 262,144 x 640 output layer was 200 ms of a 2.3 s
prompt-based step. `cache_frozen_casts(model)` makes each plain `nn.Linear` with a frozen
weight keep its cast copy while the weight is unchanged: the same values autocast would make,
so outputs and gradients are bit-identical.

On CPU in bf16 it goes one step further (`packed_weights`): torch's bf16 matmul hands oneDNN
the plain weight, which oneDNN re-lays out at every call, forward and backward; a frozen weight
is laid out once instead, as `W` for `x W^T` and as `W^T` for the input gradient `g W`, and the
layer is `PackedLinearFunction`. MiniLM's linear layers, forward plus input gradient, took
1-9% less time from 832 to 2,080 tokens and a LoRA step 3.2-4.0% less
(bench/packed_weights.py, five runs), results bit-identical; the two layouts cost twice the
weight's size in bf16, where the plain copy cost once (prediction, which never asks for `W^T`,
once). Trained weights are left to autocast: laying a weight out whole (cast, transpose, two
reorders: ~2 ms for 1,536 x 384) costs more than the matmuls save, and full fine-tuning steps
took 10% longer.

The copies are not buffers (never saved); training under FSDP or DeepSpeed skips all this
(each process would keep whole copies of weights the engine shards).
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.nn import functional as F


def cached_cast(module: nn.Module, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.detach().to(dtype)`, kept on `module` until `tensor` changes (in-place updates
    and loads bump its version) or another dtype is asked for. A trained tensor is cast at each
    call, in the graph: optimizers update it in place without bumping the version."""
    if tensor.requires_grad:
        return tensor.to(dtype)
    key = (dtype, tensor._version, tensor.data_ptr())
    cached = module.__dict__.get("_cast_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad(), torch.inference_mode(False):  # usable by autograd later
            cached = (key, tensor.detach().to(dtype))
        module.__dict__["_cast_cache"] = cached
    return cached[1]


def packed_weights(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype):
    """Frozen `weight` cast to `dtype` and laid out for oneDNN's matmul (`PackedWeight`), kept
    on `module` until the weight changes. None for a trained weight (optimizers update in place
    without bumping the version a cache would key on) and where the path is not there (CPU
    only; bf16, and fp32 for prediction's layer plans: `can_pack`)."""
    if not PACK_WEIGHTS or weight.requires_grad or weight.device.type != "cpu" \
            or not can_pack(dtype):
        return None
    memory = (dtype, weight.data_ptr(), tuple(weight.shape), weight.stride())
    cached = module.__dict__.get("_pack_cache")
    if cached is None or cached[0] != (memory, weight._version) or cached[1] is None:
        # a layer new to this memory may take the layout another layer made of it (the models
        # `tunelab serve` builds over one shared base); one whose weight was written in place
        # makes it again
        written = cached is not None and cached[0][0] == memory
        packed = None if written else _SHARED.get(memory)
        if packed is None or not packed.current():
            packed = _SHARED[memory] = PackedWeight(weight, dtype=dtype)
        cached = ((memory, weight._version), packed)
        module.__dict__["_pack_cache"] = cached
    return cached[1]


def shared_stack(weights: tuple, dtype: torch.dtype) -> "PackedWeight":
    """`PackedWeight(*weights)` (sibling weights stacked by rows), or the one made of the same
    memory before where it is current: the models `tunelab serve` builds over one shared base
    stack the same base weights once."""
    memory = (dtype, *((w.data_ptr(), tuple(w.shape), w.stride()) for w in weights))
    packed = _SHARED.get(memory)
    if packed is None or not packed.current():
        packed = _SHARED[memory] = PackedWeight(*weights, dtype=dtype)
    return packed


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
"""The `PackedWeight`s layers hold, by the memory they were made from. An entry lives as long
as a layer holds it, and it holds its weight, so the address in its key is not reused
meanwhile."""


class Uncopied:
    """Holds oneDNN layouts, which have no storage to copy or pickle: a copied or saved module
    holds None in its place and makes it again when next called (or takes the general path)."""

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return type(None), ()


class PackedWeight(Uncopied):
    """A weight laid out for oneDNN as `W`, for `x W^T` (`matrix`), and, from the first
    backward pass on (prediction never asks), as `W^T`, for the input gradient `g W`. Given
    several weights with the same input size, `W` is them stacked by rows (one matmul computes
    all their outputs side by side: `grouped.ProjectionGroup`)."""

    def __init__(self, *weights: torch.Tensor, dtype: torch.dtype):
        self.weights, self.dtype = weights, dtype
        self.versions = tuple(w._version for w in self.weights)
        self.matrix = _reorder(self._whole())
        self._transposed = None

    def current(self) -> bool:
        """Whether the weights it was made from are unchanged (no in-place write since)."""
        return tuple(w._version for w in self.weights) == self.versions

    def transposed(self) -> torch.Tensor:
        if self._transposed is None:
            self._transposed = _reorder(self._whole().t())
        return self._transposed

    def _whole(self) -> torch.Tensor:
        with torch.no_grad():
            cast = [w.detach().to(self.dtype) for w in self.weights]
            return cast[0] if len(cast) == 1 else torch.cat(cast)


def laid_out(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` cast to `dtype` and laid out for `linear_packed` (`x W^T`), keeping no plain
    copy (a `PackedWeight` keeps the weights it was made from, to tell when they change)."""
    with torch.no_grad():
        return _reorder(weight.detach().to(dtype))


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.inference_mode(False):  # usable by autograd later
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)


PACK_WEIGHTS = True
"""Whether `packed_weights` packs (False: every layer takes the plain path)."""
PACK_ROWS = 1024
"""The rows (tokens) oneDNN is told to expect when a weight is packed: a hint for the layout;
1,024 and the exact count timed the same from 832 to 2,080 tokens."""


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None):
    """`x W^T + b` for a 2-D `x` and a weight laid out by `PackedWeight` (its `matrix` for
    `x W^T`, its `transposed()` for `x W`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear_packed_add(x: torch.Tensor, packed: torch.Tensor, other: torch.Tensor):
    """`x W^T + other` in one oneDNN call (its sum post-op) for a weight laid out by
    `laid_out`; where that op is missing (`_can_add`), a matmul and an add."""
    if _can_add():
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "add")
    return linear_packed(x, packed) + other


@functools.cache
def _can_add() -> bool:
    try:
        probe = torch.ones(2, 2, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, 2)
        got = torch.ops.mkldnn._linear_pointwise.binary(probe, probe, packed, None, "add")
        return bool(torch.equal(got, probe @ probe.t() + probe))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def can_pack(dtype: torch.dtype) -> bool:
    """Whether weights in `dtype` can be laid out for oneDNN here: bf16 where the CPU has the
    packed bf16 matmul; fp32 on x86 (`_can_pack_fp32`)."""
    if dtype == torch.bfloat16:
        return _can_pack()
    return dtype == torch.float32 and _can_pack_fp32()


@functools.cache
def _can_pack_fp32() -> bool:
    """oneDNN's fp32 matmul over a laid-out weight, on x86 only: on this AMD EPYC it took
    0.53-0.56x the time of torch's `F.linear` (MKL) at 12 rows for MiniLM's shapes, 0.51-0.71x
    at 64 and 0.74-0.93x at 832-1,600 (measured in one process; MKL is not at its best on AMD
    CPUs). Elsewhere (ARM) torch's own BLAS is kept."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        probe = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, 2)
        return bool(torch.allclose(linear_packed(probe, packed), probe @ probe.t()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def _can_pack() -> bool:
    try:
        probe = torch.ones(2, 2, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, 2)
        return bool(torch.equal(linear_packed(probe, packed), probe @ probe.t()))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class PackedLinearFunction(torch.autograd.Function):
    """`x W^T + b` for a 2-D `x` in the autocast dtype and a frozen `W` laid out by
    `packed_weights`; the bias's gradient (BitFit trains it) as autocast gives it: summed in
    that dtype, returned in the bias's own. The output is a tensor of its own, not a view (a
    caller such as AdaLoRA adds into it in place)."""

    @staticmethod
    def forward(ctx, x, bias, packed):
        ctx.packed, ctx.bias_dtype = packed, None if bias is None else bias.dtype
        return linear_packed(x, packed.matrix, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        dx = linear_packed(grad, ctx.packed.transposed()) if ctx.needs_input_grad[0] else None
        d_bias = grad.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None
        return dx, d_bias, None


def grouped_output(module: nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """`module`'s output for `x` computed with its siblings' (`grouped.ProjectionGroup`), or
    None where it computes alone."""
    group = module.__dict__.get("_group")
    return None if group is None else group[0].output(group[1], x, dtype)


class CachedCastLinear(nn.Linear):
    """`nn.Linear` that, under autocast with a frozen weight, reuses its cast weight (on CPU in
    bf16, its packed weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.__dict__.get("_plan")  # prediction: `LinearPlan`
        if plan is not None and not torch.is_grad_enabled() \
                and (out := plan.output(self, x)) is not None:
            return out
        dtype = autocast_dtype(x)
        if dtype is None or self.weight.requires_grad:
            return super().forward(x)
        if (out := grouped_output(self, x, dtype)) is not None:
            return out
        packed = packed_weights(self, self.weight, dtype)
        if packed is not None:
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            if torch.is_grad_enabled():
                out = PackedLinearFunction.apply(x2, self.bias, packed)
            else:  # prediction builds no graph: none of autograd.Function's bookkeeping
                # (a short sentence's forward, merged MiniLM: 6.66 -> 5.90 ms)
                out = linear_packed(x2, packed.matrix,
                                    None if self.bias is None else self.bias.to(dtype))
            return out.view(*x.shape[:-1], out.shape[-1])
        # autocast casts x and the bias as it would have; the weight is already cast
        return F.linear(x, cached_cast(self, self.weight, dtype), self.bias)


class LinearPlan(Uncopied):
    """A frozen layer's prediction (grad off, bf16 autocast, CPU): its packed weight and bf16
    bias taken once, then called without the general path's checks and casts (a linear 65.7 ->
    51-56 us at 12 tokens; a short sentence through a merged MiniLM 5.44-6.05 -> 5.28-5.63 ms).
    Taken again when the weight or bias is written; a trained one, or another dtype or device,
    takes the general path."""

    def __init__(self):
        self.key, self.packed, self.bias = None, None, None

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if x.device.type != "cpu" or autocast_dtype(x) != torch.bfloat16:
            return None
        weight, bias = layer.weight, layer.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        key = (weight.data_ptr(), weight._version,
               None if bias is None else (bias.data_ptr(), bias._version))
        if key != self.key:
            self.packed = packed_weights(layer, weight, torch.bfloat16)
            if self.packed is None:
                return None
            self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
            self.key = key
        out = linear_packed(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.packed.matrix,
                            self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def plan_frozen_linears(model: nn.Module) -> int:
    """Give every `CachedCastLinear` of `model` a `LinearPlan` (for prediction), where the
    packed bf16 path is there; how many."""
    if not PACK_WEIGHTS or not _can_pack():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is CachedCastLinear and "_group" not in module.__dict__:
            module.__dict__.setdefault("_plan", LinearPlan())
            count += 1
    return count


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
