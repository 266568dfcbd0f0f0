"""Dropout with cheaper random masks, for training on CPU.

torch's CPU dropout draws one Bernoulli sample per element from its Mersenne Twister, and on a
2-core CPU that draw, not the arithmetic, is the cost: a MiniLM training step (batch 32, ~27
tokens) spent 14% of its time in `bernoulli_` for 20 dropout calls, 2 ms each where the
multiplication takes 0.03 ms. Here one 64-bit draw gives four 16-bit lanes, one per element: an
element is dropped when its lane falls below round(p * 65536), so the drop probability is p to
within 1/65,536 and each element's draw is independent of the others. The kept elements are
scaled by 1 / (1 - p) as torch does.

On CPU the 64-bit draws come from numpy's SFC64 generator (1.7 ns a draw where torch's
Mersenne Twister takes 3.3; 1.2% of a MiniLM LoRA step), seeded at each call from torch's
generator, so `torch.manual_seed` still makes runs repeatable. Same function, a different
random stream: `train.fast_dropout: false` restores torch's own dropout.
"""
from __future__ import annotations

import inspect
import sys

import numpy as np
import torch
from torch import nn

LANES = 4
"""16-bit lanes per 64-bit draw."""
ATTENTION = "tunelab_eager"
"""The attention implementation `use_fast_dropout` registers: BERT's eager attention with
`fast_dropout` on the attention probabilities."""
BF16_SCORES_FROM = 32
"""Key length from which `bert_eager_attention` keeps bf16 scores in bf16 (see there)."""


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`torch.nn.functional.dropout(x, p, training)` with masks from 16-bit lanes (above)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    n = x.numel()
    threshold = round(p * 65536) - 32768  # lanes are uniform over [-32768, 32767]
    if x.device.type == "cpu":
        keep = _cpu_mask(n, threshold).view(x.shape)
    else:
        words = torch.empty((n + LANES - 1) // LANES, dtype=torch.int64, device=x.device)
        words.random_(-2**63, None)  # all 64 bits random (a plain random_() leaves the top 0)
        keep = (words.view(torch.int16)[:n].view(x.shape) >= threshold).view(torch.uint8)
    # uint8 -> x.dtype: bool -> bf16 directly is a slow path on CPU (7x the time)
    return x.mul(keep.to(x.dtype)).mul(1.0 / (1.0 - p))


def _cpu_mask(n: int, threshold: int) -> torch.Tensor:
    """n uint8 flags, 1 where the element's 16-bit lane is >= `threshold` (kept)."""
    seed = int(torch.randint(0, 2**62, ()))  # torch's generator: manual_seed governs
    lanes = np.random.SFC64(seed).random_raw((n + LANES - 1) // LANES).view(np.int16)[:n]
    return torch.from_numpy(lanes >= threshold).view(torch.uint8)


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose training masks come from `fast_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def bert_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         **kwargs):
    """transformers' BERT `eager_attention_forward`, with `fast_dropout` on the attention
    probabilities, and the scaling and the mask applied in one pass over the scores.

    Under bf16 autocast the scores come out of the matmul in bf16, and adding the fp32 mask
    turns them, the softmax and the dropout to fp32, only for the next matmul to cast the
    probabilities back. From `BF16_SCORES_FROM` keys on, the mask is cast instead and the
    [batch, heads, length, length] passes stay in bf16 (half the bytes: MiniLM's attention,
    forward and backward, 2.2x faster at 128 tokens, 1.3x at 48); below it the fp32 path is
    kept, as torch's bf16 softmax is the slower one on short rows."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3))
    if attention_mask is None:
        attn_weights = scores * scaling
    else:
        if attention_mask.dtype != scores.dtype and scores.size(-1) >= BF16_SCORES_FROM:
            # fp32's most negative value is -inf in bf16: clamp to bf16's
            attention_mask = attention_mask.to(scores.dtype).clamp(
                min=torch.finfo(scores.dtype).min)
        attn_weights = torch.add(attention_mask, scores, alpha=scaling)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = fast_dropout(attn_weights, dropout, module.training)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def use_fast_dropout(model: nn.Module) -> int:
    """Switch `model`'s dropout to `fast_dropout` in place (a PEFT-wrapped model too); the
    number of dropout modules switched, plus one where the attention is. Weights, state dicts,
    saved configs (transformers does not save the attention implementation) and eval-mode
    outputs are untouched."""
    from transformers import PreTrainedModel

    switched = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = FastDropout
            switched += 1
    top = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if top is not None and top.config._attn_implementation == "eager" \
            and _has_bert_attention(top):
        _register_attention()
        top.set_attn_implementation(ATTENTION)
        switched += 1
    return switched


def _has_bert_attention(model: nn.Module) -> bool:
    """Whether the eager attention `model`'s own modeling code calls is BERT's, to the
    source text (so `bert_eager_attention` is the same function)."""
    from transformers.models.bert import modeling_bert

    own = getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None)
    if own is None:
        return False
    try:
        return inspect.getsource(own) == inspect.getsource(modeling_bert.eager_attention_forward)
    except (OSError, TypeError):
        return False


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION, bert_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)
