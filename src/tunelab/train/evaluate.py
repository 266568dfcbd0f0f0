"""Forward passes for evaluation and prediction: one engine, so the numbers `train` reports,
`eval` prints and `predict`/`serve` return come from the same code."""
from __future__ import annotations

import contextlib
import functools

import torch

from tunelab.train import engines
from tunelab.train.batching import SPLIT_COST_TOKENS, eval_batches, lockstep_batches


def autocast(device_type: str, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls ~3x fp32 there; elsewhere bf16 is slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device_type: str) -> str:
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device_type == "cpu" and cpu_has_fast_bf16() else "fp32"


def iter_logits(task, model, data, batch_size: int, pad_id: int, device, bf16: bool,
                rank: int = 0, world: int = 1, lockstep: bool = False):
    """Yield (indices, logits, batch) batch by batch, longest inputs first; logits in fp32 on
    the CPU, batch as collated (CPU tensors, labels included). `lockstep`: the model's weights
    are sharded (FSDP, ZeRO-3), so each forward pass is a collective and every process must run
    as many as the others; padding passes are run and dropped."""
    # on CPU a batch of mixed lengths is cut where padding costs more than a pass
    split_cost = SPLIT_COST_TOKENS if device.type == "cpu" else None
    batches = eval_batches(data.lengths, batch_size, split_cost)
    if lockstep and batches:
        batches, real = lockstep_batches(batches, rank, world)
    else:
        batches = batches[rank::world]  # uneven shares are fine: no collective per batch
        real = len(batches)
    was_training = model.training
    if was_training:  # eval()/train() walk every module: ~1 ms each on a LoRA MiniLM, which
        model.eval()  # a served single sentence would pay twice per request
    try:
        # no_grad, not inference_mode, for sharded weights: FSDP re-shards them after the
        # forward pass, which inference tensors forbid
        grad_off = torch.no_grad() if lockstep else torch.inference_mode()
        with grad_off, autocast(device.type, bf16):
            for i, idx in enumerate(batches):
                batch = task.collate(data, idx, pad_id)
                inputs = {k: v.to(device) for k, v in task.model_inputs(batch).items()}
                logits = model(**inputs).logits
                if i < real:
                    yield idx, logits.float().cpu(), batch
    finally:
        if was_training:
            model.train()


def evaluate(task, model, data, labels: list[str], batch_size: int, pad_id: int, device,
             bf16: bool, accelerator=None):
    """Streaming metrics over a split -> (metrics dict, the task's Metrics object). With several
    processes each takes a shard of the batches and the metric states are summed."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    lockstep = accelerator is not None and engines.shards_weights(accelerator)
    if accelerator is not None and not lockstep:
        # the bare module: DDP's forward syncs buffers, a collective that would hang when the
        # processes run different numbers of evaluation batches
        model = accelerator.unwrap_model(model)
    metrics = task.new_metrics(labels)
    for _, logits, batch in iter_logits(task, model, data, batch_size, pad_id, device, bf16,
                                        rank, world, lockstep):
        metrics.update(logits, batch)
    if world > 1:
        state = accelerator.reduce(metrics.state().to(accelerator.device), reduction="sum")
        metrics.load_state(state.cpu())
    return metrics.compute(), metrics
