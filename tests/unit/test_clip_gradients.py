"""Gradient clipping folded into fused AdamW's step: the same updates as clipping first."""
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from tunelab.train.optim import build_optimizer, clip_gradients


def net_and_grads():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    net[0].weight.requires_grad_(False)  # frozen: not the optimizer's, not in the norm
    grads = [{n: torch.randn_like(p) * scale for n, p in net.named_parameters()}
             for scale in (10.0, 0.01, 3.0)]  # clipped, under the limit, clipped
    return net, grads


def grad_norm(net) -> float:
    return torch.linalg.vector_norm(torch.stack(
        [p.grad.norm() for p in net.parameters() if p.requires_grad])).item()


def train(in_step: bool) -> dict:
    """Three AdamW steps; Adam's update is nearly blind to one step's gradient scale, not to
    the ratio between steps' scales, which is what clipping changes here."""
    acc = Accelerator(cpu=True)
    net, grads = net_and_grads()
    optimizer = acc.prepare_optimizer(build_optimizer(net, 1e-2, 0.01))
    for step in grads:
        for name, p in net.named_parameters():
            p.grad = step[name]  # the frozen weight too: a model-wide norm would count it
        norm = grad_norm(net)
        clip_gradients(acc, net, optimizer, 1.0, in_step=in_step)
        if in_step:
            assert optimizer.optimizer.grad_scale.item() == pytest.approx(max(1.0, norm), rel=1e-5)
        else:
            assert getattr(optimizer.optimizer, "grad_scale", None) is None
            assert grad_norm(net) == pytest.approx(min(1.0, norm), rel=1e-4)
        optimizer.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def test_clipping_inside_the_step_updates_as_clipping_before_it():
    before, inside = train(in_step=False), train(in_step=True)
    for name, want in before.items():
        assert torch.allclose(inside[name], want, rtol=1e-5, atol=1e-7), name
    unclipped_net, grads = net_and_grads()
    assert not torch.allclose(inside["2.weight"], unclipped_net[2].weight)
