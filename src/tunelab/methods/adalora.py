"""AdaLoRA: LoRA in SVD form (P diag(E) Q) whose rank budget is re-allocated during training
from the important layers' singular values to the others, through PEFT.

Paper: Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", arXiv 2303.10512.
Trains: the P/E/Q matrices (PEFT's lora_A, lora_E, lora_B) on the attention and feed-forward
weights, and the task head. Saves: those parameters. Pruned singular values are zeros in lora_E,
so the saved tensors reproduce the model without PEFT's rank pattern. Mergeable: yes.

Hooks the training loop must run: `on_step` (PEFT's update_and_allocate) after every optimizer
step and BEFORE the gradients are zeroed (it scores importance from p * grad), and
`extra_loss` (the orthogonal regulariser of P and Q, weighted by orth_reg_weight).
"""
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from tunelab.errors import ConfigError
from tunelab.methods.registry import ALL_TASKS, MethodSettings, register_method


@dataclass
class AdaLoraSettings(MethodSettings):
    init_r: int = 12
    """Rank every adapted layer starts with."""
    target_r: int = 8
    """Average rank per layer once the budget is pruned (the total budget is target_r x layers)."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha / init_r."""
    dropout: float = 0.0
    """Dropout on the adapter branch input (0, PEFT's default: on CPU drawing the random
    masks took 40% of a MiniLM LoRA step; raise it to regularise small data sets)."""
    tinit: float = 0.1
    """Share of the run's optimizer steps trained at init_r before pruning starts (the paper's
    t_i, as a fraction so one recipe fits any run length)."""
    tfinal: float = 0.3
    """Share of the run's optimizer steps, at the end, trained with the final budget fixed
    (the paper's t_f, as a fraction)."""
    deltaT: int = 10
    """Optimizer steps between two budget re-allocations."""
    beta1: float = 0.85
    """EMA factor of the importance (sensitivity) smoothing."""
    beta2: float = 0.85
    """EMA factor of the uncertainty quantification."""
    orth_reg_weight: float = 0.1
    """Weight of the orthogonal regulariser ||P^T P - I|| + ||Q Q^T - I|| (paper: 0.1)."""
    target_modules: list[str] | None = None
    """Module names (suffixes) to adapt; unset = attention + feed-forward for the family."""

    def __post_init__(self):
        if not 0 < self.target_r <= self.init_r:
            raise ConfigError("method.target_r must be in (0, method.init_r]")
        if not 0 <= self.dropout < 1:
            raise ConfigError("method.dropout must be in [0, 1)")
        if self.tinit < 0 or self.tfinal < 0 or self.tinit + self.tfinal >= 1:
            raise ConfigError("method.tinit and method.tfinal are shares of the run: each >= 0 "
                              "and together below 1")
        if self.deltaT < 1:
            raise ConfigError("method.deltaT must be at least 1")
        if self.orth_reg_weight < 0:
            raise ConfigError("method.orth_reg_weight must be >= 0")


def schedule(settings: AdaLoraSettings, total_steps: int | None) -> dict:
    """AdaLoRA's step schedule for a run of `total_steps` (None: loading for inference, where
    the schedule is never used; any valid one will do)."""
    total = total_steps or 100
    # tinit + tfinal < 1 (checked in the settings), so a pruning phase always remains
    return {"total_step": total, "tinit": int(settings.tinit * total),
            "tfinal": int(settings.tfinal * total)}


def on_step(model, global_step: int) -> None:
    if any(p.grad is None for n, p in model.named_parameters() if "lora_E" in n):
        raise RuntimeError("AdaLoRA's on_step needs the gradients: call it after "
                           "optimizer.step() and before optimizer.zero_grad()")
    model.base_model.update_and_allocate(global_step)


def extra_loss(model) -> torch.Tensor:
    """PEFT adds the orthogonal regulariser inside AdaLoraModel.forward, and only to an output
    that carries a loss. Run that same code on a stand-in whose forward returns a zero loss, so
    the value is PEFT's without a second pass through the model."""
    from peft.tuners.adalora import AdaLoraModel

    tuner = model.base_model  # the AdaLoraModel

    class _ZeroLoss:
        def forward(self, *args, **kwargs):
            return SimpleNamespace(loss=torch.zeros((), device=tuner.model.device))

        def named_parameters(self):
            return tuner.model.named_parameters()

    stand_in = SimpleNamespace(model=_ZeroLoss(), peft_config=tuner.peft_config,
                               trainable_adapter_name=tuner.trainable_adapter_name)
    return AdaLoraModel.forward(stand_in).loss


def merge(model):
    return model.merge_and_unload()


@register_method("adalora", settings=AdaLoraSettings, default_lr=5e-3, mergeable=True,
                 tasks=ALL_TASKS,
                 saves="adapter", paper="Zhang et al. 2023, arXiv 2303.10512", merge=merge,
                 on_step=on_step, extra_loss=extra_loss,
                 summary="LoRA whose rank budget moves to the layers that need it (PEFT)")
def apply(model, settings, ctx):
    from peft import AdaLoraConfig, get_peft_model

    from tunelab.methods.registry import peft_modules_to_save
    from tunelab.methods.lora import DEFAULT_TARGETS, peft_task_type

    config = AdaLoraConfig(task_type=peft_task_type(ctx.task), init_r=settings.init_r,
                           target_r=settings.target_r, lora_alpha=settings.alpha,
                           lora_dropout=settings.dropout, deltaT=settings.deltaT,
                           beta1=settings.beta1, beta2=settings.beta2,
                           orth_reg_weight=settings.orth_reg_weight,
                           target_modules=settings.target_modules or DEFAULT_TARGETS[ctx.family],
                           modules_to_save=peft_modules_to_save(ctx.head_modules),
                           **schedule(settings, ctx.total_steps))
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"AdaLoRA could not be applied: {e}") from None
