"""AdamW over the trainable parameters and a warm-up + decay schedule from Transformers."""
from __future__ import annotations

import torch

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight", "norm.weight")


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(NO_DECAY) or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW: one kernel over all tensors instead of a loop (CPU and CUDA in torch >= 2.4)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


def build_scheduler(optimizer, name: str, total_steps: int, warmup_ratio: float):
    from transformers import get_scheduler

    kind = {"constant": "constant_with_warmup"}.get(name, name)
    return get_scheduler(kind, optimizer, num_warmup_steps=int(total_steps * warmup_ratio),
                         num_training_steps=total_steps)
