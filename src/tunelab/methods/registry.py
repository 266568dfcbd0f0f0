"""The method registry: every adaptation method registers itself here by name.

Core code never imports a method by name; it asks the registry. A method is a function
``apply(model, settings, ctx) -> model`` that adds its parameters (if any) and leaves
``requires_grad`` set on exactly the parameters that train. The task head always trains.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch

from tunelab.errors import ConfigError


@dataclass
class MethodSettings:
    """Base for every method's settings dataclass (the recipe's `method:` section)."""


@dataclass
class ApplyContext:
    """What a method needs to know about the model it adapts."""

    task: str
    """The task name (classification, ...)."""
    head_modules: list[str]
    """Dotted names of modules that are new for the task (the head); they always train."""
    family: str
    """Model family: encoder (BERT-like), mpnet or decoder (Llama-like)."""
    total_steps: int | None = None
    """Optimizer steps the run will take (methods with schedules, e.g. AdaLoRA, need it)."""


@dataclass
class MethodSpec:
    name: str
    settings: type
    apply: Callable[[torch.nn.Module, MethodSettings, ApplyContext], torch.nn.Module]
    default_lr: float
    """Learning rate used when train.lr is unset; chosen per method (they differ 100x)."""
    mergeable: bool
    """Whether the method's weights fold into the base weights (export --to merged)."""
    saves: str
    """'model' (the whole model is saved) or 'adapter' (only the trained parameters)."""
    paper: str
    summary: str
    merge: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    """Fold the method into plain base modules; returns a model without the method."""
    families: tuple[str, ...] = ("encoder", "mpnet", "decoder")
    tasks: tuple[str, ...] = ("classification",)
    on_step: Callable[[torch.nn.Module, int], None] | None = None
    """Called after every optimizer step with the global step (AdaLoRA's rank allocation)."""
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None
    """Added to the training loss (AdaLoRA's orthogonal regulariser)."""


ALL_TASKS = ("classification", "token_classification", "mlm", "causal_lm", "instruction")
"""Every task name (tunelab.tasks registers the classes); methods list those they support."""

_METHODS: dict[str, MethodSpec] = {}
_LOADED = False


def register_method(name: str, *, settings: type, default_lr: float, mergeable: bool,
                    saves: str, paper: str, summary: str, merge=None,
                    families=("encoder", "mpnet", "decoder"), tasks=("classification",),
                    on_step=None, extra_loss=None):
    """Decorator: ``@register_method("lora", settings=LoraSettings, ...)`` on ``apply``."""
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"settings of method {name} must be a dataclass")
    if saves not in ("model", "adapter"):
        raise ValueError(f"saves must be 'model' or 'adapter', got {saves!r}")

    def wrap(apply):
        _METHODS[name] = MethodSpec(name, settings, apply, default_lr, mergeable, saves, paper,
                                    summary, merge, tuple(families), tuple(tasks), on_step,
                                    extra_loss)
        return apply

    return wrap


def _load_all() -> None:
    """Import every module of tunelab.methods once, so that each registers itself."""
    global _LOADED
    if _LOADED:
        return
    import tunelab.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"tunelab.methods.{info.name}")
    _LOADED = True


def get_method(name: str) -> MethodSpec:
    _load_all()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def all_methods() -> list[MethodSpec]:
    _load_all()
    return [_METHODS[k] for k in sorted(_METHODS)]


def check_supported(spec: MethodSpec, ctx: ApplyContext) -> None:
    if ctx.family not in spec.families:
        raise ConfigError(f"method {spec.name} does not support {ctx.family} models; it supports "
                          f"{', '.join(spec.families)} (see `tunelab methods`)")
    if ctx.task not in spec.tasks:
        raise ConfigError(f"method {spec.name} does not support task {ctx.task}; it supports "
                          f"{', '.join(spec.tasks)} (see `tunelab methods`)")


def context_for(config, built, total_steps: int | None) -> ApplyContext:
    """The ApplyContext of a run's config and its built model (tasks.base.BuiltModel)."""
    return ApplyContext(config.task.name, built.head_modules, built.family, total_steps)


def apply_method(model: torch.nn.Module, name: str, settings, ctx: ApplyContext) -> torch.nn.Module:
    spec = get_method(name)
    check_supported(spec, ctx)
    model = spec.apply(model, settings, ctx)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"method {name} left no parameter to train")
    return model


def set_head_trainable(model: torch.nn.Module, head_modules: list[str]) -> None:
    """Mark every parameter under a head module as trainable (helper for methods)."""
    for mod_name, module in model.named_modules():
        if any(mod_name == h or mod_name.endswith("." + h) for h in head_modules):
            for p in module.parameters():
                p.requires_grad_(True)


# PEFT's sequence-classification wrapper always saves `classifier` and `score` whole; listing a
# module inside them as well wraps it twice, and the inner copy trains but never runs.
PEFT_HEADS = ("classifier", "score")


def peft_modules_to_save(head_modules: list[str]) -> list[str]:
    """The head modules to pass to PEFT's modules_to_save (those it does not save itself)."""
    return [h for h in head_modules if h.split(".")[0] not in PEFT_HEADS]


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
