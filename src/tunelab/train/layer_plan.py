"""A BERT-family encoder layer's prediction computed as one plain function.

Predicting one short sentence, MiniLM spends most of its time outside the arithmetic: each of
its six layers goes through a dozen `nn.Module` calls (attention, self-attention, its output,
the feed-forward block and their linears, dropouts and norms), transformers' attention
dispatch and a `deprecate_kwarg` wrapper that inspects the signature at every call. With
gradients off, bf16 autocast and CPU, `EncoderLayerPlan` computes the layer from its parts
directly: each linear through what it has prepared for prediction (`frozen.LinearPlan`,
`fused_lora.LoraPlan`, or the module itself for anything else: adapters, IA3, AdaLoRA), SDPA as
transformers calls it, the residual adds and norms as the modules compute them, so the logits
are bit-identical to the general path (tested). Where the query, key and value projections are
all frozen plain linears (a merged LoRA run, a fully trained one) they are one matmul against
their weights stacked (`frozen.PackedWeight`), laid out once.

A LoRA layer folded (`tunelab serve`, a run alone on its base) computes through its fold the
same way; query, key and value folded are one matmul over their folds stacked.

In fp32 (no autocast; `predict.keep_weights_fp32`, on x86) the plan computes the same way over
weights laid out for oneDNN's fp32 matmul, which took about half the time of torch's own (MKL)
at a short sentence's rows here: one short sentence 8.6-9.0 -> 4.9-5.1 ms, logits within 2e-6.

Measured on a merged MiniLM LoRA run, one short sentence (12 tokens, `predict`, paired in one
process): 6.0-6.7 -> 4.5-5.0 ms; batches of 64 unchanged (the matmuls dominate there). The
general path is taken for anything else: gradients, training mode, another dtype or device,
another attention implementation (eager, prefix tuning's), cached keys and values or
cross-attention, chunked feed-forward, sub-blocks that are not the layer family's own, and
hooks on the layer's parts other than transformers' output capture.
"""
from __future__ import annotations

from functools import cache

import torch
from torch import nn
from torch.nn import functional as F

from tunelab.train import frozen
from tunelab.train.frozen import (CachedCastLinear, autocast_dtype, linear_packed,
                                  linear_packed_add)
from tunelab.train import fused_lora
from tunelab.train.fused_lora import LoraPlan, _plan_key, folded_weight

FAMILIES = (("bert", "Bert"), ("roberta", "Roberta"), ("xlm_roberta", "XLMRoberta"),
            ("electra", "Electra"))
"""transformers families whose encoder layer is BERT's (the same code in transformers 5):
(module, class prefix)."""
PLANNED_DTYPES = (torch.bfloat16, torch.float32)
"""bf16 autocast, or fp32 without autocast (where `frozen.can_pack` says the layout is there)."""
PLAN_LAYERS = True
"""Whether `plan_encoder_layers` plans (False: every layer takes the general path)."""


@cache
def _family_classes() -> dict[type, dict[str, type]]:
    """{layer class: the classes of its parts}, for the FAMILIES present in transformers."""
    import importlib

    out = {}
    for module_name, prefix in FAMILIES:
        try:
            module = importlib.import_module(f"transformers.models.{module_name}."
                                             f"modeling_{module_name}")
            names = ("Layer", "Attention", "SelfAttention", "SelfOutput", "Intermediate",
                     "Output")
            classes = {name: getattr(module, prefix + name) for name in names}
        except (ImportError, AttributeError):
            continue
        out[classes.pop("Layer")] = classes
    return out


class _Planned:
    """Put before a family's layer class in the class `planned_class` makes."""

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        plan = self.__dict__.get("_plan")
        # not when traced (ONNX export): oneDNN's packed matmul is no ONNX operator
        if plan is not None and not torch.is_grad_enabled() and not torch.jit.is_tracing() \
                and all(a is None for a in args) \
                and all(v is None or v is False for v in kwargs.values()) \
                and (out := plan.output(self, hidden_states, attention_mask)) is not None:
            return out
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


@cache
def planned_class(base: type, mixin: type = _Planned) -> type:
    """`base` with `mixin`'s forward put before its own (the layer's plan, else `base`'s)."""
    return type(f"Planned{base.__name__}", (mixin, base), {})


def attach_plans(model: nn.Module, mixin: type, families: dict, make) -> int:
    """Give every module of `model` whose class is in `families` the plan `make(module,
    families[class])` returns (None: not this one), its class becoming `planned_class(class,
    mixin)`'s; how many. Only where a packed path (bf16 or fp32) is there."""
    if not PLAN_LAYERS or not frozen.PACK_WEIGHTS \
            or not (frozen.can_pack(torch.bfloat16) or frozen.can_pack(torch.float32)):
        return 0
    count = 0
    for module in model.modules():
        cls = type(module)
        base = cls.__mro__[2] if issubclass(cls, mixin) else cls
        if base not in families or (plan := make(module, families[base])) is None:
            continue
        module.__class__ = planned_class(base, mixin)
        module.__dict__["_plan"] = plan
        count += 1
    return count


class LayerPlanBase(frozen.Uncopied):
    """What an encoder layer's plan keeps (BERT's here, MPNet's in `mpnet_plan`): its parts,
    the modules it computes without calling them (the parts and their own children: a
    linear's route may be its module, whose call then runs the module's hooks), and the routes
    of its six linears (query, key, value, attention output, feed-forward up and down), settled
    once (`_routes`) and again when one of them is replaced, written in place or set to
    train."""

    def __init__(self, parts: tuple):
        self.parts = parts
        self.members = list({id(m): m for part in parts
                             for m in (part, *part._modules.values())}.values())
        self.key, self.routes, self.act = None, None, None

    def dtype(self, layer: nn.Module, x: torch.Tensor) -> torch.dtype | None:
        """What the layer computes in now (bf16 under autocast, fp32 without it), or None
        where the plan does not apply: another device or dtype, training, hooks."""
        dtype = autocast_dtype(x) or (torch.float32 if x.dtype == torch.float32 else None)
        if x.device.type != "cpu" or dtype not in PLANNED_DTYPES or not frozen.can_pack(dtype) \
                or layer.training or _hooked(self.members):
            return None
        return dtype

    def settle(self, linears: tuple, act_fn, dtype: torch.dtype) -> None:
        key = (dtype, act_fn, *(_linear_key(m) for m in linears))
        if key != self.key:
            self.routes = _routes((linears[:3], *((m,) for m in linears[3:])), dtype)
            self.act = _act(act_fn)
            self.key = key

    def heads(self, x2: torch.Tensor, lead: tuple, heads: int, size: int, dtype: torch.dtype):
        """Query, key and value as [batch, heads, length, size] from the rows `x2`."""
        qkv = self.routes[0]
        if isinstance(qkv, tuple):
            packed = all(type(r) is _Packed for r in qkv)
            rows = x2.to(dtype) if packed else x2  # cast once for the three
            return tuple(_apply(r, rows, lead, dtype).view(*lead, heads, size).transpose(1, 2)
                         for r in qkv)
        return _apply(qkv, x2, lead, dtype).view(*lead, 3, heads, size) \
            .permute(2, 0, 3, 1, 4).unbind(0)

    def rest(self, a: torch.Tensor, x2: torch.Tensor, norms: tuple, lead: tuple,
             dtype: torch.dtype) -> torch.Tensor:
        """From the attention's mixed values `a` ([tokens, hidden]) on: its output projection,
        the residual and norm, the feed-forward block, its residual and norm (rows)."""
        _, o, up, down = self.routes
        h = _norm(norms[0], _apply(o, a, lead, dtype) + x2)
        g = self.act(_apply(up, h, lead, dtype))
        return _norm(norms[1], _apply(down, g, lead, dtype) + h)


class EncoderLayerPlan(LayerPlanBase):
    """One layer's prediction (see the module's doc); `output` is None where it does not apply
    now."""

    def __init__(self, layer: nn.Module):
        attention = layer.attention
        super().__init__((attention, attention.self, attention.output, layer.intermediate,
                          layer.output))

    def output(self, layer: nn.Module, x: torch.Tensor, mask) -> torch.Tensor | None:
        attention, attn, self_out, inter, out = self.parts
        if layer.attention is not attention or attention.self is not attn \
                or attention.output is not self_out or layer.intermediate is not inter \
                or layer.output is not out or attn.config._attn_implementation != "sdpa" \
                or (dtype := self.dtype(layer, x)) is None:
            return None
        self.settle((attn.query, attn.key, attn.value, self_out.dense, inter.dense, out.dense),
                    inter.intermediate_act_fn, dtype)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        q, k, v = self.heads(x2, lead, attn.num_attention_heads, attn.attention_head_size,
                             dtype)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                           scale=attn.scaling, is_causal=False)
        a = a.transpose(1, 2).contiguous().reshape(x2.shape[0], -1)
        return self.rest(a, x2, (self_out.LayerNorm, out.LayerNorm), lead, dtype).view(x.shape)


def _linear_key(module: nn.Module) -> tuple:
    """What `_routes` made a linear's route from: the module; for a frozen plain linear its
    tensors' memory, version and whether they train; for a planned LoRA layer
    (`fused_lora.LoraPlan`, folded or kept apart), its plan and what the plan is made from."""
    if type(module) not in (CachedCastLinear, nn.Linear):
        plan = module.__dict__.get("_plan")
        if isinstance(plan, LoraPlan):  # folded or kept apart (stacked with its siblings)
            return module, plan, _plan_key(module)
        return (module,)
    params = module._parameters
    w, b = params["weight"], params["bias"]
    return (module, w.data_ptr(), w._version, w.requires_grad,
            None if b is None else (b.data_ptr(), b._version, b.requires_grad))


class _Packed:
    """A frozen linear's route: its weight laid out for oneDNN (a `PackedWeight`'s, a folded
    `LoraPlan`'s, or folds stacked), its bias in bf16."""

    def __init__(self, matrix: torch.Tensor, bias: torch.Tensor | None, owner=None):
        self.matrix, self.bias = matrix, bias
        self.owner = owner  # a shared `PackedWeight` lives while a route holds it


def _routes(groups: tuple, dtype: torch.dtype) -> tuple:
    """For each group of linears that read one input: the route of a lone member (a `_Packed`
    or the module to call: LoRA kept apart, adapters, IA3, their own plans and checks), or for
    siblings one `_Packed` over their weights stacked where all are plain or all LoRA layers
    folded, else their routes. Weights are laid out in `dtype` (LoRA layers folded in it)."""
    def plain(m):
        return type(m) in (CachedCastLinear, nn.Linear) and not m.weight.requires_grad \
            and (m.bias is None or not m.bias.requires_grad)

    def fold(m):  # a LoRA layer's plan folded in this dtype
        plan = m.__dict__.get("_plan")
        return plan if getattr(plan, "fold", False) and plan.dtype == dtype else None

    def folded(m):  # a LoRA layer folded that applies now
        return (plan := fold(m)) is not None and (key := _plan_key(m)) is not None \
            and (plan.key == key or plan.current(m))

    def apart(m):  # a LoRA layer kept apart, planned (bf16), that applies now
        plan = m.__dict__.get("_plan")
        return dtype == torch.bfloat16 and isinstance(plan, LoraPlan) and not plan.fold \
            and plan.current(m)

    def bias(m):
        return None if m.bias is None else m.bias.detach().to(dtype)

    def route(m):
        if (plan := fold(m)) is not None:  # a LoRA layer folded: its fold, made current
            return _Packed(plan.matrix, plan.bias) if plan.current(m) else m
        if not plain(m):
            return m
        packed = frozen.packed_weights(m, m.weight, dtype)
        return m if packed is None else _Packed(packed.matrix, bias(m))

    out = []
    for group in groups:
        if len(group) > 1 and len({m.bias is None for m in group}) == 1:
            if all(plain(m) for m in group):
                stack = frozen.shared_stack(tuple(m.weight for m in group), dtype)
                out.append(_Packed(stack.matrix, _cat([bias(m) for m in group]), stack))
                continue
            if all(folded(m) for m in group):
                out.append(_stacked_folds(group))
                continue
            if all(apart(m) for m in group) \
                    and len({m.__dict__["_plan"].scaling for m in group}) == 1:
                out.append(_LoraStack(group))
                continue
        out.append(route(group[0]) if len(group) == 1 else tuple(route(m) for m in group))
    return tuple(out)


def _stacked_folds(group: tuple) -> _Packed:
    """One route for sibling LoRA layers folded: their folds (`W + (B A) s`) stacked and laid
    out, the layers' own folds released (made again only if a layer is called on its own), so
    that the stack costs no memory beyond them. Measured on the served lone MiniLM run, one
    short sentence (`predict`, in process, two rounds of three): 4.4-4.7 -> 3.6-4.4 ms, logits
    identical."""
    plans = [m.__dict__["_plan"] for m in group]
    weights = [folded_weight(m, plan.key[0]) for m, plan in zip(group, plans)]
    matrix = frozen.laid_out(torch.cat(weights), plans[0].dtype)
    bias = _cat([plan.bias for plan in plans])
    for plan in plans:
        plan.release()
    return _Packed(matrix, bias)


class _LoraStack:
    """Sibling LoRA layers kept apart (the server's runs sharing a base) as one route: their
    frozen bases stacked (`frozen.shared_stack`: once for every model over that base), their
    A stacked and their B as one block-diagonal matrix, so that query, key and value are three
    oneDNN calls where they were nine; the same values as each layer's `LoraPlan` (the zeros
    add nothing; the layers' own plans release what they laid out, made again if a layer is
    called on its own). Measured on MiniLM kept apart, one short sentence (paired, three
    rounds): 8.9-9.5 -> 6.5-8.0 ms; 640 sentences unchanged; the same logits."""

    def __init__(self, group: tuple):
        plans = [m.__dict__["_plan"] for m in group]
        bf16 = torch.bfloat16
        self.base = frozen.shared_stack(tuple(m.base_layer.weight for m in group), bf16)
        self.matrix = self.base.matrix
        self.bias = _cat([plan.bias for plan in plans])
        names = [plan.key[0] for plan in plans]
        self.bs = [plan.b for plan in plans]  # each B cast to bf16 (kept on its module)
        with torch.no_grad():
            a = torch.cat([m.lora_A[n].weight.to(bf16) for m, n in zip(group, names)])
            self.a = frozen.laid_out(a, bf16)
            self.b_laid = frozen.laid_out(torch.block_diag(*self.bs), bf16)
        self.scaling = plans[0].scaling
        for plan in plans:  # what the layers' own plans laid out is held here now
            plan.release()

    def output(self, x2: torch.Tensor) -> torch.Tensor:
        out = linear_packed(x2, self.matrix, self.bias)
        low = linear_packed(x2, self.a).mul_(self.scaling)
        if x2.shape[0] <= fused_lora.SUM_ROWS:
            return linear_packed_add(low, self.b_laid, out)
        rank, start = low.shape[1] // len(self.bs), 0  # many rows: each update added in place
        for i, b in enumerate(self.bs):
            out[:, start:start + b.shape[0]].addmm_(low[:, i * rank:(i + 1) * rank], b.t())
            start += b.shape[0]
        return out


def _cat(biases: list) -> torch.Tensor | None:
    return None if biases[0] is None else torch.cat(biases)


def _apply(route, x2: torch.Tensor, lead: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A route's output for the rows `x2` ([tokens, features]) of an input shaped `lead + (-1,)`,
    as [tokens, out_features]."""
    if type(route) is _Packed:
        return linear_packed(x2.to(dtype), route.matrix, route.bias)
    if type(route) is _LoraStack:
        return route.output(x2.to(dtype))
    out = _linear(route, x2.view(*lead, -1))
    return out.reshape(-1, out.shape[-1])


def _act(fn):
    """The activation as a plain function: transformers' GELUActivation is `F.gelu` in a module."""
    from transformers.activations import GELUActivation

    if type(fn) is GELUActivation and fn.act is F.gelu:
        return F.gelu
    return fn


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    plan = module.__dict__.get("_plan")  # frozen.LinearPlan, fused_lora.LoraPlan
    if plan is not None and (out := plan.output(module, x)) is not None:
        return out
    return module(x)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether a hook other than transformers' output capture is on one of `modules` (which the
    plan runs without calling them). The capture records attention weights, which SDPA does
    not give: nothing to record."""
    for m in modules:
        if m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks \
                or m._forward_hooks and any(getattr(h, "__name__", "") != "output_capturing_hook"
                                            for h in m._forward_hooks.values()):
            return True
    return False


def own_blocks(blocks: dict, parts: dict[str, type], norms: tuple[str, str]) -> bool:
    """Whether each of a layer's `blocks` (name -> module) is of its family's class (`parts`)
    with its own forward (not one replaced on the instance: a method's own computation), and
    the blocks named in `norms` normalise with a plain `nn.LayerNorm`."""
    if any(type(block) is not parts[name] for name, block in blocks.items()):
        return False
    if any("forward" in block.__dict__ for block in blocks.values()):
        return False
    return all(type(blocks[name].LayerNorm) is nn.LayerNorm for name in norms)


def _plannable(layer: nn.Module, parts: dict[str, type]) -> bool:
    attention = getattr(layer, "attention", None)
    blocks = {"Attention": attention, "SelfAttention": getattr(attention, "self", None),
              "SelfOutput": getattr(attention, "output", None),
              "Intermediate": getattr(layer, "intermediate", None),
              "Output": getattr(layer, "output", None)}
    return (own_blocks(blocks, parts, ("SelfOutput", "Output")) and not layer.is_decoder
            and not getattr(layer, "add_cross_attention", False)
            and layer.chunk_size_feed_forward == 0 and not attention.is_cross_attention)


def plan_encoder_layers(model: nn.Module) -> int:
    """Give every BERT-family encoder layer of `model` its `EncoderLayerPlan` (for prediction;
    its class becomes `planned_class`'s), where the packed bf16 path is there; how many."""
    return attach_plans(model, _Planned, _family_classes(),
                        lambda layer, parts: EncoderLayerPlan(layer)
                        if _plannable(layer, parts) else None)
