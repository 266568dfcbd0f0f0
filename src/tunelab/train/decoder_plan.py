"""A Llama-family decoder layer's prediction and generation step computed as one plain function.

Generating one token, SmolLM2-135M calls its 30 decoder layers through ~15 `nn.Module` calls
each (attention, MLP, norms, seven linears), transformers' attention dispatch and a
`deprecate_kwarg` wrapper per call. With gradients off, bf16 autocast and CPU,
`DecoderLayerPlan` computes the layer from its parts as `train.layer_plan` does for encoders:
the RMS norms, rotary embedding, cache update and SDPA exactly as transformers computes them
(its own `apply_rotary_pos_emb` and `sdpa_attention_forward`), each linear through its route,
and the query/key/value and the gate/up projections each one matmul against their weights
stacked where they are plain frozen linears (a merged or base model). Logits and generated
text are those of the general path (tested). Measured with SmolLM2-135M in bf16 (`tunelab
generate`'s engine), 48 new tokens, paired in one process: 30.1-30.7 -> 36.3-37.8 tokens/s, the
same text (the matmuls over 270 MB of weights a token are the rest).

The general path is taken for anything else: gradients, training mode, another dtype or device
or attention implementation (eager, prefix tuning's), parts that are not the family's own, and
hooks on the parts it runs without calling (transformers' output capture excepted).
"""
from __future__ import annotations

from functools import cache

import torch
from torch import nn

from tunelab.train import frozen
from tunelab.train.frozen import autocast_dtype, can_pack
from tunelab.train.layer_plan import _apply, _hooked, _linear_key, _routes, attach_plans

BF16 = torch.bfloat16

FAMILIES = (("llama", "Llama"),)
"""transformers families planned here: (module, class prefix)."""


@cache
def _family_classes() -> dict[type, tuple]:
    """{decoder layer class: (attention, MLP, norm classes, apply_rotary_pos_emb)}."""
    import importlib

    out = {}
    for module_name, prefix in FAMILIES:
        try:
            module = importlib.import_module(f"transformers.models.{module_name}."
                                             f"modeling_{module_name}")
            out[getattr(module, prefix + "DecoderLayer")] = (
                getattr(module, prefix + "Attention"), getattr(module, prefix + "MLP"),
                getattr(module, prefix + "RMSNorm"), module.apply_rotary_pos_emb)
        except (ImportError, AttributeError):
            continue
    return out


class _PlannedDecoder:
    """Put before a family's decoder layer class in the class `layer_plan.planned_class`
    makes."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        plan = self.__dict__.get("_plan")
        if plan is not None and not torch.is_grad_enabled() and position_embeddings is not None:
            attn_kwargs = {"position_ids": position_ids, "use_cache": use_cache, **kwargs}
            out = plan.output(self, hidden_states, attention_mask, cache, position_embeddings,
                              attn_kwargs)
            if out is not None:
                return out
        return super().forward(hidden_states, attention_mask, position_ids, cache, use_cache,
                               position_embeddings, **kwargs)


class DecoderLayerPlan(frozen.Uncopied):
    """One decoder layer's forward (see the module's doc); `output` is None where it does not
    apply now. Routes are settled once and again when a linear is replaced, written or set to
    train."""

    def __init__(self, layer: nn.Module, rotary):
        self.parts = (layer.self_attn, layer.mlp, layer.input_layernorm,
                      layer.post_attention_layernorm)
        self.members = list({id(m): m for part in self.parts
                             for m in (part, *part._modules.values())}.values())
        self.rotary, self.key, self.routes = rotary, None, None

    def output(self, layer, x, mask, cache, position_embeddings, attn_kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        attn, mlp, norm1, norm2 = self.parts
        if x.device.type != "cpu" or autocast_dtype(x) != BF16 or not can_pack(BF16) \
                or layer.training \
                or layer.self_attn is not attn or layer.mlp is not mlp \
                or layer.input_layernorm is not norm1 \
                or layer.post_attention_layernorm is not norm2 \
                or attn.config._attn_implementation != "sdpa" or _hooked(self.members):
            return None
        groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,),
                  (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,))
        key = (mlp.act_fn, *(_linear_key(m) for group in groups for m in group))
        if key != self.key:
            self.routes, self.key = _routes(groups, BF16), key
        qkv, o, gate_up, down = self.routes
        lead, size = x.shape[:-1], attn.head_dim
        h = _rms(norm1, x)
        q, k, v = (t.view(*lead, -1, size).transpose(1, 2)
                   for t in _group(qkv, groups[0], h.reshape(-1, h.shape[-1]), lead))
        cos, sin = position_embeddings
        q, k = self.rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, attn.layer_idx, kwargs=attn_kwargs)
        a, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling,
                                      **attn_kwargs)
        a = a.reshape(*lead, -1).contiguous()
        x = x + _apply(o, a.reshape(-1, a.shape[-1]), lead, BF16).view(*lead, -1)
        h = _rms(norm2, x)
        gate, up = _group(gate_up, groups[2], h.reshape(-1, h.shape[-1]), lead)
        return x + _apply(down, mlp.act_fn(gate) * up, lead, BF16).view(*lead, -1)


def _group(route, members: tuple, x2: torch.Tensor, lead: tuple) -> list[torch.Tensor]:
    """Each member's output for the rows `x2`: split from one stacked matmul, or one by one."""
    if isinstance(route, tuple):
        return [_apply(r, x2, lead, BF16) for r in route]
    return _apply(route, x2, lead, BF16).split([m.out_features for m in members], dim=-1)


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The family's RMS norm (LlamaRMSNorm.forward: in fp32, the weight applied after)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def plan_decoder_layers(model: nn.Module) -> int:
    """Give every Llama-family decoder layer of `model` its `DecoderLayerPlan` (for prediction
    and generation; its class becomes `layer_plan.planned_class`'s), where the packed bf16
    path is there; how many."""
    def make(layer, spec):
        attention, mlp, norm, rotary = spec
        parts = (layer.self_attn, layer.mlp, layer.input_layernorm,
                 layer.post_attention_layernorm)
        if [type(p) for p in parts] != [attention, mlp, norm, norm] \
                or any("forward" in p.__dict__ for p in parts):
            return None
        return DecoderLayerPlan(layer, rotary)

    return attach_plans(model, _PlannedDecoder, _family_classes(), make)
