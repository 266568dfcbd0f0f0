"""Word-embedding gradients added, row by row, into a tensor kept across steps (CPU training).

A dense embedding backward allocates a zeroed gradient the size of the whole table at every
step (MiniLM: 30,522 x 384, 47 MB; Gemma-3: 262,144 x 640, 671 MB) and adds the batch's few
thousand rows into it. glibc maps allocations that large straight from the system, so each
step also pays one page fault per 4 KB as the zeros are written: 11-13 ms of a ~250 ms MiniLM
step, against 1.5 ms here. `EmbeddingGrads` switches a model's large trainable embeddings to
sparse gradients (the touched rows only) and keeps one dense gradient tensor per embedding:
autograd adds the rows into it in place, so the clipping and the optimizer see the dense
gradient they always did. A weight tied to an output layer (masked LM) gets that layer's
dense gradient added into the same tensor. Used on CPU by `tunelab train` (one process on
the plain engine: DDP, FSDP and DeepSpeed reduce the gradients themselves), SetFit's encoder
training and prompt-based training.
"""
from __future__ import annotations

import torch
from torch import nn

MIN_ROWS = 4096
"""Smaller tables (position, token-type, prompt embeddings) keep torch's dense gradients."""


class EmbeddingGrads:
    """The kept gradients of `model`'s trainable embeddings of at least `MIN_ROWS` rows."""

    def __init__(self, model: nn.Module):
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        seen = set()
        for module in model.modules():
            if not isinstance(module, nn.Embedding) or module.num_embeddings < MIN_ROWS:
                continue
            weight = module.weight
            if not weight.requires_grad or module.max_norm is not None:
                continue  # max_norm renormalises rows in place: left to torch
            module.sparse = True
            if id(weight) not in seen:
                seen.add(id(weight))
                self.pairs.append((weight, torch.zeros_like(weight)))

    def __len__(self) -> int:
        return len(self.pairs)

    def attach(self) -> None:
        """Before a step's first backward: each weight's gradient is its kept tensor, zeroed
        if the optimizer let go of it (`zero_grad(set_to_none=True)`)."""
        for weight, grad in self.pairs:
            if weight.grad is not grad:
                grad.zero_()
                weight.grad = grad
