"""Frozen projections that read the same input computed as one matmul while training.

An attention block projects its input three times (query, key, value; a gated MLP twice: gate
and up). With the backbone frozen (LoRA, BitFit, adapters, prompt and prefix tuning) each is a
matmul with a small weight, and backward adds three input gradients, each cast back to fp32,
in two more activation-sized passes. `group_projections` makes such siblings one
`ProjectionGroup`: the first of them to be called computes all their outputs with one matmul
against the weights stacked by rows, laid out for oneDNN once (`frozen.PackedWeight`), and
the others take theirs; backward is one matmul with the gradients side by side, `[g_q g_k
g_v] [W_q; W_k; W_v]`, where there were three and two sums. LoRA's update and a trained bias
(BitFit) go in as in `fused_lora.LoraLinearFunction`, the members' LoRA `A`s stacked too. On
MiniLM's shapes (864 to 2,080 tokens, bf16, two threads) the input gradient took 0.55-0.77x the
time of the three matmuls and sums, and a LoRA step 0.959-0.990x (bench/packed_weights.py,
paired steps, four runs). Trained weights are left alone: stacked and cast at every step, a
layer's three took 0.98-1.01x the time forward and backward.

Only on CPU in bf16 (where weights are laid out in advance) and only in training set-ups: a
forward pass alone took 0.89-1.04x the time, so prediction keeps one layer at a time. A member
whose state does not fit this call (its weight trained, LoRA not in its plain form, another
input than its siblings') computes alone as before; outputs and gradients are those of the
members computed one by one up to the order of bf16 sums.
"""
from __future__ import annotations

import torch
from torch import nn

from tunelab.train import frozen
from tunelab.train.frozen import CachedCastLinear, PackedWeight, _can_pack, linear_packed

SIBLINGS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"),
            ("q_lin", "k_lin", "v_lin"), ("gate_proj", "up_proj"))
"""Names of an attention block's (or gated MLP's) projections of one input, in the model
families tunelab trains: BERT/RoBERTa/XLM-R/ELECTRA, Llama/Qwen/Gemma/SmolLM, DistilBERT."""
GROUP = True
"""Whether grouped members compute together (False: each alone, as without grouping; so too
with `frozen.PACK_WEIGHTS` off, since a group computes with its weights laid out)."""


def group_projections(model: nn.Module) -> int:
    """Make each set of `SIBLINGS` in `model` whose members are frozen-weight linears
    (`CachedCastLinear`, or tunelab's fused LoRA layer over one) a `ProjectionGroup`; the
    number of groups. Call after `cache_frozen_casts` and `fuse_lora_layers`."""
    from tunelab.train.fused_lora import _Fused

    count = 0
    for module in model.modules():
        for names in SIBLINGS:
            members = [getattr(module, name, None) for name in names]
            if not all(isinstance(m, CachedCastLinear) or (
                    isinstance(m, _Fused) and isinstance(m.base_layer, CachedCastLinear))
                    for m in members):
                continue
            if len({_base(m).in_features for m in members}) != 1:
                continue
            group = ProjectionGroup(members)
            for index, member in enumerate(members):
                member.__dict__["_group"] = (group, index)
            count += 1
    return count


def _version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version  # inference tensors count no writes


def _base(member: nn.Module) -> nn.Linear:
    return getattr(member, "base_layer", member)


class ProjectionGroup:
    """Sibling projections of one input; `output(i, x)` computes all on the first call for `x`
    and hands the others theirs when they are called with the same `x`."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._packed: PackedWeight | None = None
        self._pending = None  # (x, its version, {index: output}) not yet taken

    def __getstate__(self):  # copies and pickles drop the pending outputs and the layout
        return {**self.__dict__, "_packed": None, "_pending": None}

    def output(self, index: int, x: torch.Tensor, dtype: torch.dtype):
        """Member `index`'s output for `x` under autocast to `dtype`, or None where it computes
        alone."""
        if not (GROUP and frozen.PACK_WEIGHTS) or dtype != torch.bfloat16 \
                or x.device.type != "cpu":
            return None
        pending = self._pending
        if pending is not None and pending[0] is x and pending[1] == _version(x) \
                and index in pending[2]:
            out = pending[2].pop(index)
            if not pending[2]:
                self._pending = None
            return out
        plan = self._plan()
        if plan is None:
            return None
        layout, tensors = plan
        packed = self._packed_weights(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # the casts autocast would make
        outs = GroupedLinearFunction.apply(x2, packed, layout, *(t.to(dtype) for t in tensors))
        outs = [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]  # views made outside
        self._pending = (x, _version(x), {i: o for i, o in enumerate(outs) if i != index})
        return outs[index]

    def _plan(self):
        """(layout, tensors) for `GroupedLinearFunction`, or None where a member's state does
        not fit: per member (out features, has a bias, LoRA scaling or None); the tensors are
        each member's bias if any and LoRA A and B weights if any, in order."""
        if not _can_pack():
            return None
        layout, tensors = [], []
        for member in self.members:
            base = _base(member)
            if base.weight.requires_grad:
                return None
            scaling = None
            if member is not base:
                if not member._plain():
                    return None
                name = member.active_adapters[0]
                if member.fan_in_fan_out or not isinstance(member.lora_dropout[name],
                                                           nn.Identity):
                    return None
                scaling = member.scaling[name]
            layout.append((base.out_features, base.bias is not None, scaling))
            if base.bias is not None:
                tensors.append(base.bias)
            if scaling is not None:
                tensors += [member.lora_A[name].weight, member.lora_B[name].weight]
        return tuple(layout), tensors

    def _packed_weights(self, dtype: torch.dtype) -> PackedWeight:
        weights = [_base(m).weight for m in self.members]
        packed = self._packed
        if packed is None or packed.dtype != dtype or not packed.current() \
                or any(a is not b for a, b in zip(packed.weights, weights)):
            packed = self._packed = PackedWeight(*weights, dtype=dtype)
        return packed


class GroupedLinearFunction(torch.autograd.Function):
    """The outputs of frozen linears of one 2-D input `x2` whose weights `packed` holds stacked
    by rows; `layout` and `tensors` as `ProjectionGroup._plan` gives them, all in `x2`'s dtype
    (the casts autocast would make are made outside). LoRA's updates `(s x A^T) B^T` are
    `LoraLinearFunction`'s, with the members' `A`s stacked: one matmul for all their `x A^T`
    forward, and for all their input gradients and `A` gradients backward."""

    @staticmethod
    def forward(ctx, x2, packed, layout, *tensors):
        slices, biases, a_s, b_s, start, it = [], [], [], [], 0, iter(tensors)
        for out_features, has_bias, scaling in layout:
            slices.append((start, start + out_features))
            start += out_features
            biases.append(next(it) if has_bias else None)
            if scaling is not None:
                a_s.append(next(it))
                b_s.append(next(it))
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([torch.zeros(e - s, dtype=x2.dtype) if b is None else b
                              for b, (s, e) in zip(biases, slices)])
        y = linear_packed(x2, packed.matrix, bias)
        saved = [x2]
        if a_s:
            a_all = torch.cat(a_s) if len(a_s) > 1 else a_s[0]
            low_all = torch.mm(a_all, x2.t())  # x A^T for every member's A: [sum r, tokens]
            lows = low_all.split([a.shape[0] for a in a_s])
            for low_t, scaling in zip(lows, _scalings(layout)):
                low_t.mul_(scaling)
            for low_t, b, (s, e) in zip(lows, b_s, _lora_slices(slices, layout)):
                y[:, s:e].addmm_(low_t.t(), b.t())
            saved += [a_all, low_all, *b_s]
        ctx.save_for_backward(*saved)
        ctx.packed, ctx.layout, ctx.slices = packed, layout, slices
        ctx.ranks = [a.shape[0] for a in a_s]
        return tuple(y[:, s:e] for s, e in slices)

    @staticmethod
    def backward(ctx, *grads):
        x2, *lora_saved = ctx.saved_tensors
        layout = ctx.layout
        grads = [torch.zeros(x2.shape[0], e - s, dtype=x2.dtype) if g is None else g
                 for g, (s, e) in zip(grads, ctx.slices)]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = linear_packed(torch.cat(grads, 1), ctx.packed.transposed())
        lora_grads = [g for g, (_, _, scaling) in zip(grads, layout) if scaling is not None]
        d_as, d_bs = [None] * len(lora_grads), [None] * len(lora_grads)
        if lora_grads:
            a_all, low_all, *b_s = lora_saved
            g_low_all = torch.empty_like(low_all)  # the gradient of every member's low
            for g_low, b, g, scaling in zip(g_low_all.split(ctx.ranks), b_s, lora_grads,
                                            _scalings(layout)):
                torch.mm(b.t(), g.t(), out=g_low).mul_(scaling)
            if dx is not None:
                dx.addmm_(g_low_all.t(), a_all)
            d_a_all = torch.mm(g_low_all, x2)
            d_as = list(d_a_all.split(ctx.ranks))
            d_bs = [torch.mm(low_t, g).t()
                    for low_t, g in zip(low_all.split(ctx.ranks), lora_grads)]
        returned, wanted, lora = [], iter(ctx.needs_input_grad[3:]), 0
        for g, (_, has_bias, scaling) in zip(grads, layout):
            if has_bias:
                returned.append(g.sum(0) if next(wanted) else None)
            if scaling is not None:
                returned.append(d_as[lora] if next(wanted) else None)
                returned.append(d_bs[lora] if next(wanted) else None)
                lora += 1
        return dx, None, None, *returned


def _lora_slices(slices, layout) -> list[tuple[int, int]]:
    return [sl for sl, (_, _, scaling) in zip(slices, layout) if scaling is not None]


def _scalings(layout) -> list[float]:
    return [scaling for _, _, scaling in layout if scaling is not None]
