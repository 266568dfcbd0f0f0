"""(IA)^3: learned vectors that rescale the attention keys and values and the feed-forward
activations, through PEFT.

Paper: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", arXiv 2205.05638.
Trains: one vector per adapted layer (l_k, l_v on the key/value projections, l_ff on the input of
the second feed-forward layer) and the task head. The vectors start at ones, so the model equals
the base model at init. Saves: those parameters only. Mergeable: yes (each vector folds into its
weight matrix; PEFT's merge_and_unload).
"""
import re
from dataclasses import dataclass

from tunelab.errors import ConfigError
from tunelab.methods.registry import (ALL_TASKS, MethodSettings, peft_modules_to_save,
                                      register_method)

# The paper's placement: keys, values and the feed-forward down projection (its input is
# rescaled). Regexes (PEFT full-matches them against module names) so that BERT's attention
# output projection, also named `output.dense`, is not taken for the feed-forward one.
DEFAULT_TARGETS = {
    "encoder": (r".*\.attention\.self\.(key|value)|.*\.layer\.\d+\.output\.dense",
                r".*\.layer\.\d+\.output\.dense"),
    "mpnet": (r".*\.attention\.attn\.(k|v)|.*\.layer\.\d+\.output\.dense",
              r".*\.layer\.\d+\.output\.dense"),
    "decoder": (r".*\.self_attn\.(k_proj|v_proj)|.*\.mlp\.down_proj", r".*\.mlp\.down_proj"),
}

@dataclass
class IA3Settings(MethodSettings):
    target_modules: str | None = None
    """Regex (full match on module names) of the layers to rescale; unset = keys, values and
    the feed-forward down projection for the model family."""
    feedforward_modules: str | None = None
    """Regex of the target layers whose input (not output) is rescaled; unset = the
    feed-forward down projection. Must be a subset of target_modules."""

    def __post_init__(self):
        for key in ("target_modules", "feedforward_modules"):
            value = getattr(self, key)
            if value is not None:
                try:
                    re.compile(value)
                except re.error as e:
                    raise ConfigError(f"method.{key} is not a valid regex: {e}") from None
        if (self.target_modules is None) != (self.feedforward_modules is None):
            raise ConfigError("set both method.target_modules and method.feedforward_modules, "
                              "or neither")


def merge(model):
    # PEFT's IA3 unload assumes every saved module has a .weight (true for BERT's Linear head,
    # not for MPNet's two-layer head), so put the trained head copies in place first.
    from peft.utils import ModulesToSaveWrapper

    inner = model.get_base_model()
    wrapped = [n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name in sorted(wrapped, key=lambda n: -n.count(".")):
        wrapper = inner.get_submodule(name)
        parent, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent), child,
                wrapper.modules_to_save[wrapper.active_adapters[0]])
    return model.merge_and_unload()


@register_method("ia3", settings=IA3Settings, default_lr=1e-2, mergeable=True, saves="adapter",
                 tasks=ALL_TASKS,
                 paper="Liu et al. 2022, arXiv 2205.05638", merge=merge,
                 summary="learned rescaling of keys, values and feed-forward activations (PEFT)")
def apply(model, settings, ctx):
    from peft import IA3Config, get_peft_model

    from tunelab.methods.lora import peft_task_type

    targets, feedforward = DEFAULT_TARGETS[ctx.family]
    if settings.target_modules is not None:
        targets, feedforward = settings.target_modules, settings.feedforward_modules
    config = IA3Config(task_type=peft_task_type(ctx.task), target_modules=targets,
                       feedforward_modules=feedforward,
                       modules_to_save=peft_modules_to_save(ctx.head_modules))
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"IA3 could not be applied: {e}") from None
