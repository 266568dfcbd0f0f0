"""Full fine-tuning: every parameter of the backbone and the head trains.

Paper: the fine-tuning recipe of BERT (Devlin et al. 2019, arXiv 1810.04805).
Trains: everything. Saves: the whole model (a plain Transformers folder under model/).
"""
from dataclasses import dataclass

from tunelab.methods.registry import ALL_TASKS, MethodSettings, register_method


@dataclass
class FullSettings(MethodSettings):
    pass


@register_method("full", settings=FullSettings, default_lr=5e-5, mergeable=True, saves="model",
                 tasks=ALL_TASKS,
                 paper="Devlin et al. 2019, arXiv 1810.04805",
                 summary="every parameter trains")
def apply(model, settings, ctx):
    for p in model.parameters():
        p.requires_grad_(True)
    return model
