"""Prompt tuning: a few learned "soft prompt" embeddings placed before the input, through PEFT.

Paper: Lester, Al-Rfou and Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", arXiv 2104.08691.
Trains: the prompt embeddings (num_virtual_tokens x hidden) and the task head. Saves: those.
Mergeable: no (the prompt is extra input, not a weight change). The prompt gets token type 0
on BERT-style models (PEFT prepends zeros to token_type_ids).

Decoders: PEFT feeds the model `inputs_embeds`, so Llama-style heads can no longer find the last
real token from `input_ids` and would read the last position, which is padding in a
right-padded batch. `pool_last_real_token` fixes that from the attention mask.
"""
from dataclasses import dataclass

import torch

from tunelab.errors import ConfigError
from tunelab.methods.registry import MethodSettings, register_method

INITS = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM"}


@dataclass
class PromptSettings(MethodSettings):
    num_virtual_tokens: int = 20
    """Length of the soft prompt in tokens."""
    init: str = "vocab"
    """Prompt initialisation: vocab (embeddings of randomly sampled vocabulary tokens, the
    paper's better option) or random."""

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ConfigError("method.num_virtual_tokens must be at least 1")
        if self.init not in INITS:
            raise ConfigError(f"method.init must be one of {', '.join(INITS)}; got {self.init!r}")


def _move_last_real_token(backbone, args, kwargs, output):
    """Forward hook on a decoder backbone: put each row's last attended hidden state at the
    last position, where the sequence-classification head reads it."""
    mask = kwargs.get("attention_mask")  # (B, P+T), prompt included
    if mask is None or mask.dim() != 2:
        return output
    hidden = output.last_hidden_state  # (B, P+T, H)
    last = mask.size(1) - 1 - mask.flip(-1).to(torch.int64).argmax(-1)  # (B,)
    picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)
    output.last_hidden_state = torch.cat([hidden[:, :-1], picked[:, None]], dim=1)
    return output


def pool_last_real_token(peft_model, ctx) -> None:
    """For decoders: make the head read the last real token (see the module docstring)."""
    if ctx.family == "decoder":
        backbone = peft_model.get_base_model().base_model  # LlamaModel inside ...ForSeqCls
        backbone.register_forward_hook(_move_last_real_token, with_kwargs=True)


def wrap(model, config, ctx, what: str):
    from peft import get_peft_model

    try:
        model = get_peft_model(model, config)
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{what} could not be applied: {e}") from None
    pool_last_real_token(model, ctx)
    return model


@register_method("prompt", settings=PromptSettings, default_lr=1e-2, mergeable=False,
                 tasks=("classification", "token_classification", "causal_lm", "instruction"),
                 saves="adapter", paper="Lester et al. 2021, arXiv 2104.08691",
                 summary="learned soft-prompt embeddings before the input (PEFT)")
def apply(model, settings, ctx):
    from peft import PromptTuningConfig

    from tunelab.methods.registry import peft_modules_to_save
    from tunelab.methods.lora import peft_task_type

    config = PromptTuningConfig(task_type=peft_task_type(ctx.task),
                                num_virtual_tokens=settings.num_virtual_tokens,
                                prompt_tuning_init=INITS[settings.init],
                                modules_to_save=peft_modules_to_save(ctx.head_modules))
    return wrap(model, config, ctx, "prompt tuning")
