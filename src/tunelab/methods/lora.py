"""LoRA: low-rank updates W + (alpha/r) * B @ A on chosen linear layers, through PEFT.

Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
Trains: the A/B matrices and the task head. Saves: those parameters only. Mergeable: yes
(B @ A folds into W; PEFT's merge_and_unload).
"""
from dataclasses import dataclass

from tunelab.errors import ConfigError
from tunelab.methods.registry import (ALL_TASKS, MethodSettings, peft_modules_to_save,
                                      register_method)

# Module names per family: all attention projections and the feed-forward layers. On a small
# encoder, LoRA on query/value only barely moves the loss (PERF notes); all linear layers at
# r=8 matches full fine-tuning within a point on SST-2.
DEFAULT_TARGETS = {
    "encoder": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"],
    "mpnet": ["q", "k", "v", "o", "intermediate.dense", "output.dense"],
    "decoder": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class LoraSettings(MethodSettings):
    r: int = 8
    """Rank of the update matrices."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input (0, PEFT's default: on CPU drawing the random
    masks took 40% of a MiniLM LoRA step; raise it to regularise small data sets)."""
    target_modules: list[str] | None = None
    """Module names (suffixes) to adapt; unset = attention + feed-forward for the family."""

    def __post_init__(self):
        if self.r <= 0:
            raise ConfigError("method.r must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError("method.dropout must be in [0, 1)")


def peft_task_type(task: str) -> str | None:
    from tunelab.tasks import task_class

    return task_class(task).peft_task_type


def merge(model):
    return model.merge_and_unload()


@register_method("lora", settings=LoraSettings, default_lr=5e-4, mergeable=True, saves="adapter",
                 tasks=ALL_TASKS,
                 paper="Hu et al. 2021, arXiv 2106.09685", merge=merge,
                 summary="low-rank updates on attention and feed-forward weights (PEFT)")
def apply(model, settings, ctx):
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules or DEFAULT_TARGETS[ctx.family]
    config = LoraConfig(task_type=peft_task_type(ctx.task), r=settings.r,
                        lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets,
                        modules_to_save=peft_modules_to_save(ctx.head_modules))
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"LoRA could not be applied: {e}") from None
