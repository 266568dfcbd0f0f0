"""Prefix tuning: learned key/value vectors prepended to the self-attention of every layer.

Paper: Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv 2101.00190 (for classification with encoders this is also P-tuning v2, Liu et al. 2022,
arXiv 2110.07602).
Trains: the prefix parameters and the task head. With `reparameterize` (the paper's recipe) the
prefix is MLP(P'): a small matrix P' (num_virtual_tokens x hidden) through a two-layer MLP that
outputs every layer's keys and values; otherwise the keys and values are trained directly.
Saves: those parameters (P' and the MLP, or the raw prefix). Mergeable: no.

Written by hand, one implementation for every family. PEFT passes the prefix as
`past_key_values`, which BERT-family models reject under transformers 5 ("Model does not
support past key values") and MPNet never supported. Here the prefix goes in at the attention
itself:
- BERT-family and Llama-family models call their attention through Transformers'
  AttentionInterface. The model is switched to a registered implementation, "tunelab_prefix",
  that concatenates the layer's prefix in front of the keys and values (after RoPE, so the
  prefix carries no position, as with PEFT's cache) and widens the mask so every query sees
  every prefix slot, then runs SDPA.
- MPNet computes attention inline (with a relative position bias), so its self-attention
  forward is replaced by the same computation with the prefix (and a zero position bias for the
  prefix columns) added.
"""
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.registry import (ALL_TASKS, MethodSettings, register_method,
                                      set_head_trainable)

ATTN_IMPL = "tunelab_prefix"
# Children that identify a self-attention module, per family.
QKV = {"encoder": ("query", "key", "value"), "mpnet": ("q", "k", "v"),
       "decoder": ("q_proj", "k_proj", "v_proj")}


@dataclass
class PrefixSettings(MethodSettings):
    num_virtual_tokens: int = 16
    """Prefix length: key/value slots added to every layer's attention."""
    reparameterize: bool = True
    """Produce the prefix with the paper's MLP (more stable training); false = train the
    key/value vectors directly (P-tuning v2 style)."""
    mlp_hidden: int = 128
    """Hidden size of the reparameterisation MLP."""

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ConfigError("method.num_virtual_tokens must be at least 1")
        if self.mlp_hidden < 1:
            raise ConfigError("method.mlp_hidden must be positive")


class PrefixEncoder(nn.Module):
    """Every layer's prefix keys and values: layer i -> (2, P, kv_dim)."""

    def __init__(self, layers: int, tokens: int, hidden: int, kv_dim: int, settings):
        super().__init__()
        self.layers, self.tokens, self.kv_dim = layers, tokens, kv_dim
        self.reparameterize = settings.reparameterize
        if self.reparameterize:
            self.embedding = nn.Parameter(torch.randn(tokens, hidden))  # P' (P, H)
            self.mlp_in = nn.Linear(hidden, settings.mlp_hidden)
            self.mlp_out = nn.Linear(settings.mlp_hidden, layers * 2 * kv_dim)
        else:
            self.prefix = nn.Parameter(torch.randn(layers, 2, tokens, kv_dim) * 0.02)

    def forward(self, layer: int) -> torch.Tensor:
        if not self.reparameterize:
            return self.prefix[layer]
        h = torch.tanh(self.mlp_in(self.embedding))  # (P, M)
        rows = slice(layer * 2 * self.kv_dim, (layer + 1) * 2 * self.kv_dim)
        kv = F.linear(h, self.mlp_out.weight[rows], self.mlp_out.bias[rows])  # (P, 2 * kv_dim)
        return kv.view(self.tokens, 2, self.kv_dim).transpose(0, 1)  # (2, P, kv_dim)


class LayerPrefix:
    """One attention module's view of the encoder. A plain object, not a Module, so that the
    encoder's parameters are registered once (under `prefix_encoder`), not once per layer."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder, self.layer = encoder, layer

    def extend(self, key: torch.Tensor, value: torch.Tensor):
        """(B, Hkv, T, D) keys and values -> (B, Hkv, P + T, D) with the prefix in front."""
        batch, heads, _, dim = key.shape
        kv = self.encoder(self.layer).to(key.dtype)  # (2, P, Hkv * D)
        kv = kv.view(2, 1, -1, heads, dim).transpose(2, 3).expand(2, batch, heads, -1, dim)
        return torch.cat([kv[0], key], dim=2), torch.cat([kv[1], value], dim=2)


def extend_mask(mask, tokens: int, q_len: int, causal: bool, device):
    """Let every query attend to the `tokens` prefix slots in front of the keys."""
    if mask is not None:  # (B|1, 1|H, T, S): bool (True = attend) or additive float
        return F.pad(mask, (tokens, 0), value=True if mask.dtype == torch.bool else 0.0)
    if not causal or q_len == 1:
        return None
    # SDPA's is_causal would align the triangle to the top-left of the widened key axis.
    causal_part = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    prefix_part = torch.ones(q_len, tokens, dtype=torch.bool, device=device)
    return torch.cat([prefix_part, causal_part], dim=1)[None, None]  # (1, 1, T, P + T)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """The "tunelab_prefix" attention implementation: SDPA over [prefix; keys]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = module.__dict__.get("tunelab_prefix")
    if prefix is not None:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        key, value = prefix.extend(key, value)
        attention_mask = extend_mask(attention_mask, prefix.encoder.tokens, query.shape[2],
                                     causal, query.device)
        kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def mpnet_attention_forward(self, hidden_states, attention_mask=None, position_bias=None,
                            output_attentions=False, **kwargs):
    """MPNetSelfAttention.forward (transformers 5) with the layer's prefix in front of k, v."""
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    q = self.q(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, D)
    k = self.k(hidden_states).view(shape).transpose(1, 2)
    v = self.v(hidden_states).view(shape).transpose(1, 2)
    k, v = self.tunelab_prefix.extend(k, v)  # (B, H, P + T, D)
    tokens = self.tunelab_prefix.encoder.tokens
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
    if position_bias is not None:  # the prefix has no position: zero bias
        scores = scores + F.pad(position_bias, (tokens, 0))
    if attention_mask is not None:
        scores = scores + extend_mask(attention_mask, tokens, q.shape[2], False, q.device)
    probs = self.dropout(F.softmax(scores, dim=-1))
    c = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(*hidden_states.shape[:-1], -1)
    o = self.o(c)
    return (o, probs) if output_attentions else (o,)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, prefix_attention)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def attention_modules(model, family: str) -> list[nn.Module]:
    q, k, v = QKV[family]
    return [m for m in model.modules()
            if all(isinstance(getattr(m, c, None), nn.Linear) for c in (q, k, v))]


@register_method("prefix", settings=PrefixSettings, default_lr=1.5e-3, mergeable=False,
                 tasks=ALL_TASKS,
                 saves="adapter", paper="Li & Liang 2021, arXiv 2101.00190",
                 summary="learned key/value prefix in every attention layer")
def apply(model, settings, ctx):
    for p in model.parameters():
        p.requires_grad_(False)
    modules = attention_modules(model, ctx.family)
    if not modules:
        raise ConfigError(f"prefix tuning found no self-attention layers with "
                          f"{'/'.join(QKV[ctx.family])} projections in this {ctx.family} model "
                          f"(fused GPT-2-style attention is not supported)")
    key_proj = getattr(modules[0], QKV[ctx.family][1])
    encoder = PrefixEncoder(len(modules), settings.num_virtual_tokens,
                            key_proj.in_features, key_proj.out_features, settings)
    encoder.to(device=key_proj.weight.device)
    model.prefix_encoder = encoder
    for i, module in enumerate(modules):
        module.__dict__["tunelab_prefix"] = LayerPrefix(encoder, i)
        if ctx.family == "mpnet":
            module.forward = types.MethodType(mpnet_attention_forward, module)
    if ctx.family != "mpnet":
        register_attention()
        model.set_attn_implementation(ATTN_IMPL)
        if model.config._attn_implementation != ATTN_IMPL:  # a model without the interface
            raise ConfigError(f"prefix tuning needs a model whose attention goes through "
                              f"Transformers' AttentionInterface; {type(model).__name__} "
                              f"does not")
    set_head_trainable(model, ctx.head_modules)
    return model
