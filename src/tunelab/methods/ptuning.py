"""P-tuning: soft-prompt embeddings produced by a small prompt encoder (an MLP or LSTM over
learned virtual-token embeddings), placed before the input, through PEFT.

Paper: Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385.
Trains: the virtual-token embeddings, the prompt encoder and the task head. Saves: those.
Mergeable: no. Like prompt tuning, the prompt is extra input; on decoders the head is pointed
at the last real token (see tunelab.methods.prompt).
"""
from dataclasses import dataclass

from tunelab.errors import ConfigError
from tunelab.methods.prompt import wrap
from tunelab.methods.registry import MethodSettings, register_method

ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}


@dataclass
class PTuningSettings(MethodSettings):
    num_virtual_tokens: int = 20
    """Length of the soft prompt in tokens."""
    encoder: str = "mlp"
    """Prompt encoder: mlp (PEFT's default) or lstm (the paper's bidirectional LSTM + MLP)."""
    encoder_hidden_size: int | None = None
    """Hidden size of the prompt encoder; unset = the model's hidden size."""
    encoder_dropout: float = 0.0
    """Dropout inside the prompt encoder."""

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ConfigError("method.num_virtual_tokens must be at least 1")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"method.encoder must be one of {', '.join(ENCODERS)}; "
                              f"got {self.encoder!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError("method.encoder_hidden_size must be positive")
        if not 0 <= self.encoder_dropout < 1:
            raise ConfigError("method.encoder_dropout must be in [0, 1)")


@register_method("ptuning", settings=PTuningSettings, default_lr=3e-3, mergeable=False,
                 tasks=("classification", "token_classification", "causal_lm", "instruction"),
                 saves="adapter", paper="Liu et al. 2021, arXiv 2103.10385",
                 summary="soft prompt from a small prompt encoder (PEFT)")
def apply(model, settings, ctx):
    from peft import PromptEncoderConfig

    from tunelab.methods.registry import peft_modules_to_save
    from tunelab.methods.lora import peft_task_type

    extra = {}
    if settings.encoder_hidden_size is not None:
        extra["encoder_hidden_size"] = settings.encoder_hidden_size
    config = PromptEncoderConfig(task_type=peft_task_type(ctx.task),
                                 num_virtual_tokens=settings.num_virtual_tokens,
                                 encoder_reparameterization_type=ENCODERS[settings.encoder],
                                 encoder_dropout=settings.encoder_dropout,
                                 modules_to_save=peft_modules_to_save(ctx.head_modules), **extra)
    return wrap(model, config, ctx, "P-tuning")
