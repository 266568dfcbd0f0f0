"""Frozen linear weights cast once under autocast: bit-identical, recast when they change."""
import copy

import torch
from torch import nn

from tunelab.train.frozen import CachedCastLinear, cache_frozen_casts


def frozen_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    net[0].weight.requires_grad_(False)  # frozen layer, trainable bias (BitFit-like)
    net[2].requires_grad_(True)
    return net


def run(net, x):
    with torch.autocast("cpu", torch.bfloat16):
        out = net(x)
    out.float().pow(2).sum().backward()
    return out, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_outputs_and_gradients_are_bit_identical_to_autocast():
    plain = frozen_net()
    cached = copy.deepcopy(plain)
    assert cache_frozen_casts(cached) == 1  # only the frozen layer
    assert type(cached[0]) is CachedCastLinear and type(cached[2]) is nn.Linear
    x = torch.randn(8, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    for _ in range(2):  # the second call uses the kept copy
        out_a, grads_a = run(plain, x)
        out_b, grads_b = run(cached, x2)
        assert out_b.dtype == torch.bfloat16 and torch.equal(out_a, out_b)
        assert grads_a.keys() == grads_b.keys() and "0.bias" in grads_b
        assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
        assert torch.equal(x.grad, x2.grad)


def test_the_copy_is_kept_recast_on_change_and_never_saved():
    net = frozen_net()
    cache_frozen_casts(net)
    layer, x = net[0], torch.randn(3, 16)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        layer(x)  # made under inference mode ...
    kept = layer._cast_cache[1]
    x.requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        before = layer(x)
        before.float().sum().backward()  # ... and still usable by autograd
        assert layer._cast_cache[1] is kept
        with torch.no_grad():
            layer.weight.mul_(2)
        after = layer(x)
    assert layer._cast_cache[1] is not kept
    assert torch.allclose(after.float() - layer.bias, 2 * (before.float() - layer.bias),
                          rtol=0.02, atol=0.02)
    assert set(net.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with torch.no_grad():  # without autocast: plain fp32
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
