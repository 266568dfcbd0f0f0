"""The training recipe: an explicit loop on Accelerate, read top to bottom.

Why not `transformers.Trainer` (measured in docs/benchmarks.md): a well-configured Trainer is
about as fast, so the reason is exactness. An explicit loop makes three things exact that users
of Trainer-based tools report broken: the loss under gradient accumulation (divided by the
items in the whole optimizer step), resume at the exact batch (the batch order is a pure
function of seed and epoch), and what gets saved (the head is always part of the adapter).
Accelerate still provides devices, DDP/FSDP/DeepSpeed and trackers; train/engines.py holds
the few places where the loop must act differently under a sharding engine (docs/scaling.md).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab import experiments, runs
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import registry
from tunelab.train import engines
from tunelab.train.batching import shard, train_batches
from tunelab.train.evaluate import autocast, evaluate
from tunelab.train.memory import HeapTrimmer, release_heap
from tunelab.train.optim import build_optimizer, build_scheduler, clip_gradients
from tunelab.train.setup import Prepared, prepare


@dataclass
class LoopState:
    """What a checkpoint must remember beyond weights and optimizer (saved as trainer.json)."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    tokens: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    history: list = field(default_factory=list)


def train(config, resume: str | Path | None = None, quiet: bool = False,
          on_evaluate: Callable[[int, dict], None] | None = None) -> Path:
    """Train per `config`; with `resume`, continue that run from its latest checkpoint.

    `on_evaluate(step, metrics)` is called after each validation evaluation and the checkpoint
    due with it; an exception it raises stops the run there, resumable (this is how a
    hyper-parameter search prunes a poor trial)."""
    p = prepare(config, resume, quiet)
    cfg, acc = p.config, p.accelerator
    with experiments.running(p.run_dir, acc):
        spec = registry.get_method(cfg.method.name)
        # the optimizer is built on the bare model and handed to `prepare` with it: Accelerate
        # then swaps its parameters for the engine's (FSDP's DTensor shards, DeepSpeed's
        # partitions); the scheduler only rescales the optimizer's lr and stays ours
        optimizer = build_optimizer(p.model, p.lr, cfg.train.weight_decay)
        scheduler = build_scheduler(optimizer, cfg.train.schedule, p.total_steps,
                                    cfg.train.warmup_ratio)
        p.saved = None if spec.saves == "model" else {
            n for n, prm in p.model.named_parameters() if prm.requires_grad}  # names before wrapping
        engines.configure(acc, p.model, cfg.train, spec)
        model, optimizer = acc.prepare(p.model, optimizer)
        if engines.shards_state(acc):
            acc.register_for_checkpointing(scheduler)  # saved and restored by save/load_state
        state = LoopState()
        ckpt = runs.latest_checkpoint(p.run_dir) if resume else None
        if ckpt is not None:
            state = LoopState(**load_checkpoint(acc, ckpt, model, optimizer, scheduler))
            if acc.is_main_process:
                runs.truncate_metrics(p.run_dir / "metrics.jsonl", state.step)
            p.say(f"resuming {p.run_dir} at step {state.step} of {p.total_steps}")
        run_loop(p, spec, model, optimizer, scheduler, state, on_evaluate)
        finish(p, spec, model, state)
        run_dir = p.run_dir
        del p, model, optimizer, scheduler  # see end_processes
    end_processes(acc)
    release_heap()
    return run_dir


def end_processes(acc) -> None:
    """Every process leaves together and drops the model before the process group goes.

    An engine's sharded model holds the process group's workers (FSDP keeps the group itself);
    freed only when the interpreter shuts down, a worker that still releases a tensor then
    needs a Python that is gone and the process aborts ("terminate called without an active
    exception") after the run was written. So the last references go here, while Python is
    alive, then the group is destroyed."""
    acc.wait_for_everyone()
    if acc.num_processes > 1:
        acc.free_memory()  # the Accelerator's own references to the model and optimizer
        gc.collect()
    acc.end_training()


def run_loop(p: Prepared, spec, model, optimizer, scheduler, state: LoopState,
             on_evaluate: Callable[[int, dict], None] | None = None) -> None:
    cfg, acc = p.config.train, p.accelerator
    bar = p.progress(state.step)
    epoch, pos = divmod(state.step, p.steps_per_epoch)
    model.train()
    trim_heap = HeapTrimmer()
    window = {"loss": 0.0, "items": 0, "tokens": 0, "t0": time.perf_counter()}
    while state.step < p.total_steps and not state.stopped_early:
        batches = shard(train_batches(p.train.lengths, cfg.batch_size, cfg.seed, epoch,
                                      cfg.group_by_length), acc.process_index, acc.num_processes)
        for start in range(pos * cfg.grad_accum, len(batches), cfg.grad_accum):
            group = batches[start:start + cfg.grad_accum]
            t0 = time.perf_counter()
            loss_sum, items, tokens = optimizer_step(p, spec, model, optimizer, scheduler, group,
                                                     state.step + 1)
            state.step += 1
            state.train_seconds += time.perf_counter() - t0
            state.tokens += tokens
            state.samples += items
            window["loss"] += loss_sum
            window["items"] += items
            window["tokens"] += tokens
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == p.total_steps:
                log_train(p, state, window, scheduler, bar)
                trim_heap()
            after_step(p, spec, model, optimizer, scheduler, state, on_evaluate)
            if state.step >= p.total_steps or state.stopped_early:
                break
        epoch, pos = epoch + 1, 0
    bar.close()


def optimizer_step(p: Prepared, spec, model, optimizer, scheduler, group,
                   step: int = 1) -> tuple[float, int, int]:
    """One optimizer step over `group` micro-batches. The loss is the sum over every item of
    the step (all micro-batches, all processes) divided by their total count, so it equals the
    full-batch loss whatever the accumulation or world size."""
    acc = p.accelerator
    task = p.task
    batches = [task.collate(p.train, idx, p.pad_id) for idx in group]
    local_items = sum(task.count_items(b) for b in batches)
    total = local_items
    if acc.num_processes > 1:
        total = int(acc.reduce(torch.tensor(local_items, device=acc.device), "sum").item())
    loss_sum, tokens = 0.0, 0
    if p.embedding_grads is not None:
        p.embedding_grads.attach()
    for i, batch in enumerate(batches):
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        sync = i == len(batches) - 1
        engines.mark_boundary(acc, sync)
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            with autocast(acc.device.type, p.bf16):
                logits = task.train_logits(model, batch)
            s, _ = task.loss_sum(logits, batch)
            loss = s * acc.num_processes / total
            if spec.extra_loss is not None:
                loss = loss + spec.extra_loss(acc.unwrap_model(model)) / len(batches)
            acc.backward(loss)
        loss_sum += s.item()
        tokens += task.count_tokens(batch)
    if p.config.train.max_grad_norm:  # under DeepSpeed the engine clipped inside acc.backward
        clip_gradients(acc, model, optimizer, p.config.train.max_grad_norm,
                       in_step=spec.on_step is None)
    optimizer.step()
    if spec.on_step is not None:  # AdaLoRA's rank allocation reads the gradients: before zeroing
        spec.on_step(acc.unwrap_model(model), step)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, local_items, tokens


def log_train(p: Prepared, state: LoopState, window: dict, scheduler, bar) -> None:
    acc = p.accelerator
    stats = torch.tensor([window["loss"], window["items"], window["tokens"]], dtype=torch.double)
    if acc.num_processes > 1:
        stats = acc.reduce(stats.to(acc.device), "sum").cpu()
    seconds = max(time.perf_counter() - window["t0"], 1e-9)
    record = {"step": state.step, "epoch": round(state.step / p.steps_per_epoch, 4),
              "loss": float(stats[0] / max(stats[1], 1)), "lr": scheduler.get_last_lr()[0],
              "samples_per_s": float(stats[1]) / seconds, "tokens_per_s": float(stats[2]) / seconds}
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    p.log(record)
    window.update(loss=0.0, items=0, tokens=0, t0=time.perf_counter())


def after_step(p: Prepared, spec, model, optimizer, scheduler, state: LoopState,
               on_evaluate: Callable[[int, dict], None] | None = None) -> None:
    """Evaluate, keep the best weights, stop early and checkpoint when due."""
    cfg = p.config.train
    last = state.step >= p.total_steps
    eval_due = (state.step % cfg.eval_every == 0) if cfg.eval_every else \
        (state.step % p.steps_per_epoch == 0)
    eval_due = (eval_due or last) and "validation" in p.encoded
    if eval_due:
        metric = p.task.metric
        metrics, _ = evaluate(p.task, model, p.encoded["validation"], p.labels,
                              cfg.eval_batch_size, p.pad_id, p.accelerator.device, p.bf16,
                              p.accelerator)
        value = metrics[metric]
        lower = metric in p.task.lower_is_better
        better = state.best_metric is None or (
            value < state.best_metric if lower else value > state.best_metric)
        if better:
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
            weights = engines.full_state(p.accelerator, model, p.saved)  # every process joins
            if p.accelerator.is_main_process:
                runs.save_state_dict(weights, p.run_dir / "best", extra={"step": state.step})
        else:
            state.bad_evals += 1
        p.log({"step": state.step, "split": "validation", **metrics, "best": better})
        p.say(f"step {state.step}: validation {metric} {value:.4f}"
              f"{' (best)' if better else ''}")
        if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
            state.stopped_early = True
            p.say(f"early stop: {metric} did not improve for {state.bad_evals} evaluations")
    save_due = (state.step % cfg.save_every == 0) if cfg.save_every else eval_due
    if (save_due or last or state.stopped_early):
        checkpoint(p, spec, model, optimizer, scheduler, state)
    if eval_due and on_evaluate is not None:
        on_evaluate(state.step, metrics)


def checkpoint(p: Prepared, spec, model, optimizer, scheduler, state: LoopState) -> None:
    if engines.shards_state(p.accelerator):
        engines.save_checkpoint(p.accelerator, p.run_dir, state.step, state.__dict__)
        return
    p.accelerator.wait_for_everyone()
    if p.accelerator.is_main_process:
        runs.save_checkpoint(p.run_dir, state.step, p.accelerator.unwrap_model(model), optimizer,
                             scheduler, state.__dict__, whole=spec.saves == "model")
    p.accelerator.wait_for_everyone()


def load_checkpoint(acc, ckpt: Path, model, optimizer, scheduler) -> dict:
    """The trainer state of `ckpt`, with weights, optimizer, scheduler and RNG restored. A
    checkpoint only resumes under the kind of engine that wrote it: sharded optimizer state
    cannot be read by a plain run, nor the other way round."""
    sharded = engines.is_sharded_checkpoint(ckpt)
    if sharded != engines.shards_state(acc):
        wrote = "FSDP/DeepSpeed" if sharded else "one process or DDP"
        raise TunelabError(f"cannot resume {ckpt}: it was written under {wrote}; launch the "
                           f"resumed run the same way (same accelerate config)")
    if sharded:
        return engines.load_checkpoint(acc, ckpt)
    return runs.load_checkpoint(ckpt, acc.unwrap_model(model), optimizer, scheduler)


def finish(p: Prepared, spec, model, state: LoopState) -> None:
    """Reload the best weights, evaluate every split, write the final weights and results."""
    acc = p.accelerator
    unwrapped = acc.unwrap_model(model)
    best = p.run_dir / "best"
    if state.best_step is not None and state.best_step != state.step:
        if engines.shards_weights(acc):
            from safetensors.torch import load_file

            from tunelab.io import existing_dir

            found = existing_dir(best)
            weights = load_file(str(found / runs.WEIGHTS)) if acc.is_main_process else {}
            engines.load_full_state(acc, model, weights)
        else:
            runs.load_state_dict_into(unwrapped, best)
        p.say(f"restored the best weights (step {state.best_step})")
    results = {}
    for split in ("validation", "test"):
        if split in p.encoded:
            metrics, tracker = evaluate(p.task, model, p.encoded[split], p.labels,
                                        p.config.train.eval_batch_size, p.pad_id, acc.device,
                                        p.bf16, acc)
            results[split] = metrics
            if acc.is_main_process:
                p.say(f"\n{split}:\n" + tracker.report())
                tracker.save_artifacts(p.run_dir, split, f"{split} ({p.config.method.name})")
    trainable, total = p.parameters  # counted before wrapping: shards report partial sizes
    seconds = max(state.train_seconds, 1e-9)
    results["train"] = {
        "steps": state.step, "best_step": state.best_step, "stopped_early": state.stopped_early,
        "seconds": round(state.train_seconds, 2), "samples": state.samples * acc.num_processes,
        "samples_per_s": state.samples * acc.num_processes / seconds,
        "tokens_per_s": state.tokens * acc.num_processes / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100.0 * trainable / total, "precision": "bf16" if p.bf16 else "fp32",
        "processes": acc.num_processes,
    }
    weights = engines.full_state(acc, model, p.saved) if engines.shards_weights(acc) else None
    acc.wait_for_everyone()
    if acc.is_main_process:
        runs.save_final(p.run_dir, unwrapped, p.tokenizer, spec, p.config.method, weights)
        from tunelab.io import atomic_write_json

        atomic_write_json(p.run_dir / "results.json", results)
        p.say(f"run written to {p.run_dir}")


def plan_steps(n_batches: int, train_cfg) -> tuple[int, int]:
    """(steps per epoch, total steps)."""
    per_epoch = max(1, math.ceil(n_batches / train_cfg.grad_accum))
    total = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * per_epoch))
    return per_epoch, total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_metric(task) -> None:
    if task.metric not in task.metrics:
        raise ConfigError(f"train.metric must be one of {', '.join(task.metrics)} for task "
                          f"{task.name}; got {task.metric!r}")


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))
