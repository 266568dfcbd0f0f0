"""What the loop does differently when Accelerate runs it under a sharding engine: FSDP (torch's
FullyShardedDataParallel, version 1 or 2) or DeepSpeed ZeRO.

Accelerate owns the engines (launch, process groups, wrapping, collectives, sharded
checkpoints); nothing here shards or communicates by itself. Under DDP or a single process
none of these functions change behaviour. Under a sharding engine three things the plain loop
relies on stop being true, and this file holds the answer to each:

- A process no longer holds whole weights (FSDP, ZeRO-3) or whole optimizer state (FSDP,
  ZeRO-1/2/3), so `state_dict()` of one process is not the model: weights are gathered with
  `Accelerator.get_state_dict` (a collective every process joins), and resumable checkpoints
  go through `Accelerator.save_state`/`load_state`, which write every process's shard.
- A forward pass is a collective (each layer all-gathers its weights), so every process must
  run the same number of forward passes, in evaluation too.
- DeepSpeed's engine, not the loop, steps the optimizer and clips the gradients: the
  accumulation boundary and the clipping norm must be handed to it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from tunelab.errors import ConfigError, TunelabError
from tunelab.io import atomic_write_text

STATE = "accelerate"  # the folder inside state/checkpoint-N/ that Accelerate's save_state fills


def kind(acc) -> str:
    """'fsdp', 'deepspeed' or 'plain' (one process, DDP or anything else Accelerate runs)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "plain"


def check_requested(acc) -> None:
    """Accelerate (1.15) runs FSDP and DeepSpeed only on GPUs and other accelerators: with
    `cpu=True` it drops an FSDP or DeepSpeed config without a word and trains with plain DDP,
    which would silently use a different engine (and memory plan) than the one asked for."""
    import accelerate

    wanted = [name for name, var in (("fsdp", "ACCELERATE_USE_FSDP"),
                                     ("deepspeed", "ACCELERATE_USE_DEEPSPEED"))
              if os.environ.get(var, "false").lower() == "true"]
    if wanted and kind(acc) != wanted[0]:
        raise TunelabError(
            f"the accelerate config asks for {wanted[0]}, but Accelerate {accelerate.__version__} "
            f"runs {wanted[0]} only on GPUs (or other accelerators) and this process got "
            f"device {acc.device}; it would train with plain data parallelism instead. On CPUs "
            f"use `accelerate launch --multi_gpu --num_processes N` (DDP over gloo).")


def zero_stage(acc) -> int:
    return int(acc.state.deepspeed_plugin.zero_stage) if kind(acc) == "deepspeed" else 0


def shards_weights(acc) -> bool:
    """No process holds whole weights: every forward pass is a collective."""
    return kind(acc) == "fsdp" or zero_stage(acc) == 3


def shards_state(acc) -> bool:
    """Optimizer state (and perhaps weights) live in per-process shards: checkpoints must be
    written by every process through Accelerate, not by the main process alone."""
    return kind(acc) != "plain"


def configure(acc, model: torch.nn.Module, train_cfg, spec) -> None:
    """Settle what the engine needs from the recipe before `acc.prepare`, so the accelerate
    config files need no per-recipe values ("auto" is filled from the recipe)."""
    engine = kind(acc)
    if engine == "plain":
        return
    if spec.on_step is not None:
        # AdaLoRA's rank allocator reads each weight's whole gradient after backward; FSDP
        # shards those gradients and DeepSpeed keeps them in its own flat buffers
        raise ConfigError(f"method.name={spec.name} reads whole gradients after each step, "
                          f"which {engine} does not keep; train it with DDP or one process")
    if engine == "fsdp":
        configure_fsdp(acc, model)
    else:
        configure_deepspeed(acc, train_cfg)


def configure_fsdp(acc, model: torch.nn.Module) -> None:
    """FSDP2's transformer auto-wrap defaults to the model's `_no_split_modules`. For BERT-like
    models that list holds the embeddings block (BertEmbeddings), and Accelerate (1.15) then
    shards the word-embedding table a second time on its own and fails inside `fully_shard`
    ("Invariant encountered: value was None"). Wrapping only the classes that do not contain
    the input embeddings keeps Accelerate's own handling of the embeddings, for every family."""
    plugin = acc.state.fsdp_plugin
    if not acc.is_fsdp2 or plugin.transformer_cls_names_to_wrap is not None:
        return
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = list(getattr(model, "_no_split_modules", None) or [])
    if embed is None or not names:
        return
    holders = {type(m).__name__ for m in model.modules()
               if m is not embed and any(sub is embed for sub in m.modules())}
    plugin.transformer_cls_names_to_wrap = [n for n in names if n not in holders]


def configure_deepspeed(acc, train_cfg) -> None:
    """tunelab's loop feeds the engine its own micro-batches (no DataLoader for Accelerate to
    read a batch size from), marks the accumulation boundary itself and already divides the loss
    by the items of the whole step; DeepSpeed must therefore see one micro-batch per step (it
    would divide the loss by its gradient_accumulation_steps once more) and the recipe's batch
    size and clipping norm."""
    plugin = acc.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        ds["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise ConfigError(f"the DeepSpeed config sets gradient_accumulation_steps="
                          f"{ds['gradient_accumulation_steps']}; set it to 1 or auto and use "
                          f"train.grad_accum={ds['gradient_accumulation_steps']} instead")
    ds["gradient_accumulation_steps"] = 1
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * acc.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(train_cfg.max_grad_norm or 0.0)
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError("the DeepSpeed config defines an optimizer or scheduler; remove it: "
                          "tunelab builds them from the recipe (train.lr, train.schedule, ...)")


def mark_boundary(acc, last: bool) -> None:
    """Tell Accelerate whether this micro-batch ends the optimizer step. Under DeepSpeed,
    `acc.backward` then steps the engine (optimizer, clipping, zeroing) only on the last one;
    elsewhere the flag changes nothing the loop relies on."""
    acc.sync_gradients = last


def full_state(acc, model, trained: set[str] | None) -> dict[str, torch.Tensor]:
    """Whole weights on the main process ({} elsewhere): every parameter, or the `trained`
    names only. A collective under FSDP and ZeRO-3: every process must call it."""
    from tunelab.runs import trained_state

    if not shards_weights(acc):
        if not acc.is_main_process:
            return {}
        return trained_state(acc.unwrap_model(model), whole=trained is None)
    state = acc.get_state_dict(model)
    if not acc.is_main_process:
        return {}
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()
            if trained is None or k in trained}


def load_full_state(acc, model, state: dict[str, torch.Tensor]) -> None:
    """Put whole weights (read by the main process; {} elsewhere is fine) back into a sharded
    model. A collective under FSDP and ZeRO-3; elsewhere each process loads its own copy."""
    if kind(acc) == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict)

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, state, options=options)
        return
    if zero_stage(acc) == 3:
        import deepspeed

        module = acc.unwrap_model(model)
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if acc.is_main_process:
                module.load_state_dict(state, strict=False)
        return
    acc.unwrap_model(model).load_state_dict(state, strict=False)


def save_checkpoint(acc, run_dir: Path, step: int, trainer_state: dict) -> None:
    """state/checkpoint-<step>/ written by every process through `Accelerator.save_state`
    (model and optimizer shards, every process's RNG, the scheduler registered in loop.train),
    then `latest` points at it. Same commit protocol as runs.save_checkpoint: a crash before
    `latest` moves leaves the previous checkpoint in charge."""
    state_dir = run_dir / "state"
    name = f"checkpoint-{step}"
    tmp = state_dir / f".{name}.tmp"  # one name every process can compute
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / STATE), safe_serialization=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
        shutil.rmtree(state_dir / name, ignore_errors=True)
        os.replace(tmp, state_dir / name)
        atomic_write_text(state_dir / "latest", name)
        for old in state_dir.glob("checkpoint-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (ckpt / STATE).is_dir()


def load_checkpoint(acc, ckpt: Path) -> dict:
    """Restore what save_checkpoint wrote; the trainer state (step, best, history) comes back."""
    acc.load_state(str(ckpt / STATE))
    return json.loads((ckpt / "trainer.json").read_text())

