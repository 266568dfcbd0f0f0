"""An MPNet encoder layer's prediction computed as one plain function (`layer_plan`'s, for
MPNet's layer: its own attention with the relative position bias).

MPNet's layer computes attention by hand (scores, the position bias added in place, the mask,
softmax, the mix) inside four module calls a layer, each linear through its own. `MPNetLayerPlan`
computes the same ops in the same order from the layer's parts, each linear through the route
`layer_plan._routes` settles (query, key and value one matmul over their weights stacked where
all three are plain frozen linears, or a LoRA layer's fold), so the logits are bit-identical
to the general path in bf16 (tested) and within fp32's rounding in fp32. Measured on
all-mpnet-base-v2's shapes (random weights, 12 layers of 768), in one process: one short
sentence 16.3-18.7 -> 14.2-15.3 ms in bf16 and 53.7-55.0 -> 20.1-20.7 ms in fp32 (its linears
laid out for oneDNN's fp32 matmul: `predict.keep_weights_fp32`); 640 sentences in batches of
64 unchanged in bf16 (57.7-64.7 against 59.5-65.7 sentences/s), 29.1-29.8 -> 31.8-32.4 in
fp32. The general path is
taken wherever `layer_plan`'s would be (gradients, training mode, tracing, hooks on the parts,
replaced parts or forwards) and where attention weights are asked for.
"""
from __future__ import annotations

import math
from functools import cache

import torch
from torch import nn

from tunelab.train.layer_plan import LayerPlanBase, attach_plans, own_blocks


@cache
def _family_classes() -> dict[type, dict[str, type]]:
    """{MPNet's layer class: the classes of its parts}, where transformers has MPNet."""
    try:
        from transformers.models.mpnet import modeling_mpnet as m
    except ImportError:
        return {}
    return {m.MPNetLayer: {"Attention": m.MPNetAttention, "SelfAttention": m.MPNetSelfAttention,
                           "Intermediate": m.MPNetIntermediate, "Output": m.MPNetOutput}}


class _PlannedMPNet:
    """Put before MPNet's layer class in the class `layer_plan.planned_class` makes."""

    def forward(self, hidden_states, attention_mask=None, position_bias=None,
                output_attentions=False, **kwargs):
        plan = self.__dict__.get("_plan")
        if plan is not None and not torch.is_grad_enabled() and not torch.jit.is_tracing() \
                and not output_attentions \
                and all(v is None or v is False for v in kwargs.values()) \
                and (out := plan.output(self, hidden_states, attention_mask,
                                        position_bias)) is not None:
            return (out,)
        return super().forward(hidden_states, attention_mask, position_bias,
                               output_attentions, **kwargs)


class MPNetLayerPlan(LayerPlanBase):
    """One MPNet layer's prediction; `output` is None where it does not apply now."""

    def __init__(self, layer: nn.Module):
        attention = layer.attention
        super().__init__((attention, attention.attn, layer.intermediate, layer.output))

    def output(self, layer: nn.Module, x: torch.Tensor, mask, position_bias):
        attention, attn, inter, out = self.parts
        if layer.attention is not attention or attention.attn is not attn \
                or layer.intermediate is not inter or layer.output is not out \
                or (dtype := self.dtype(layer, x)) is None:
            return None
        self.settle((attn.q, attn.k, attn.v, attn.o, inter.dense, out.dense),
                    inter.intermediate_act_fn, dtype)
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        heads, size = attn.num_attention_heads, attn.attention_head_size
        q, k, v = self.heads(x2, lead, heads, size, dtype)
        # MPNetSelfAttention's own ops, in its order (the dtypes follow as they do there)
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(size)
        if position_bias is not None:
            scores += position_bias
        if mask is not None:
            scores = scores + mask
        probs = nn.functional.softmax(scores, dim=-1)
        c = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous().view(-1, heads * size)
        return self.rest(c, x2, (attention.LayerNorm, out.LayerNorm), lead, dtype).view(x.shape)


def plan_mpnet_layers(model: nn.Module) -> int:
    """Give every MPNet layer of `model` that can take it an `MPNetLayerPlan`; how many."""
    def make(layer, parts):
        return MPNetLayerPlan(layer) if _plannable(layer, parts) else None

    return attach_plans(model, _PlannedMPNet, _family_classes(), make)


def _plannable(layer: nn.Module, parts: dict[str, type]) -> bool:
    attention = getattr(layer, "attention", None)
    blocks = {"Attention": attention, "SelfAttention": getattr(attention, "attn", None),
              "Intermediate": getattr(layer, "intermediate", None),
              "Output": getattr(layer, "output", None)}
    return own_blocks(blocks, parts, ("Attention", "Output"))
