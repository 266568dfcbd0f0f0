"""Forward passes for evaluation and prediction: one engine, so the numbers `train` reports,
`eval` prints and `predict`/`serve` return come from the same code."""
from __future__ import annotations

import contextlib
import functools

import torch

from tunelab.train.batching import eval_batches


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
                rank: int = 0, world: int = 1):
    """Yield (indices, logits, batch) batch by batch, longest inputs first; logits in fp32 on
    the CPU, batch as collated (CPU tensors, labels included)."""
    batches = eval_batches(data.lengths, batch_size)[rank::world]  # uneven shares are fine
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device.type, bf16):
            for idx in batches:
                batch = task.collate(data, idx, pad_id)
                inputs = {k: v.to(device) for k, v in task.model_inputs(batch).items()}
                yield idx, model(**inputs).logits.float().cpu(), batch
    finally:
        model.train(was_training)


def evaluate(task, model, data, labels: list[str], batch_size: int, pad_id: int, device,
             bf16: bool, accelerator=None):
    """Streaming metrics over a split -> (metrics dict, the task's Metrics object). With several
    processes each takes a shard of the batches and the metric states are summed."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    if accelerator is not None:
        # the bare module: DDP's forward syncs buffers, a collective that would hang when the
        # processes run different numbers of evaluation batches
        model = accelerator.unwrap_model(model)
    metrics = task.new_metrics(labels)
    for _, logits, batch in iter_logits(task, model, data, batch_size, pad_id, device, bf16,
                                        rank, world):
        metrics.update(logits, batch)
    if world > 1:
        state = accelerator.reduce(metrics.state().to(accelerator.device), reduction="sum")
        metrics.load_state(state.cpu())
    return metrics.compute(), metrics
