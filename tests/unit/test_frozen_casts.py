"""Linear weights cast once under autocast, and on CPU bf16 laid out for oneDNN once:
bit-identical to autocast, recast when they change, trained weights never stale."""
import copy

import pytest
import torch
from torch import nn

from tunelab.train import frozen
from tunelab.train.frozen import (CachedCastLinear, cache_frozen_casts, linear_packed,
                                  packed_weights)

PACKS = frozen._can_pack()


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


@pytest.mark.parametrize("pack", [False, True])
def test_outputs_and_gradients_are_bit_identical_to_autocast(monkeypatch, pack):
    monkeypatch.setattr(frozen, "PACK_WEIGHTS", pack)
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
        assert grads_b["0.bias"].dtype == torch.float32
        assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
        assert torch.equal(x.grad, x2.grad)
    assert ("_pack_cache" in cached[0].__dict__) == (pack and PACKS)


def test_the_copy_is_kept_recast_on_change_and_never_saved():
    net = frozen_net()
    cache_frozen_casts(net)
    layer, x = net[0], torch.randn(3, 16)
    cache = "_pack_cache" if PACKS else "_cast_cache"
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        layer(x)  # made under inference mode ...
    kept = layer.__dict__[cache][1]
    x.requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16):
        before = layer(x)
        before.float().sum().backward()  # ... and still usable by autograd
        assert layer.__dict__[cache][1] is kept
        with torch.no_grad():
            layer.weight.mul_(2)
        after = layer(x)
    assert layer.__dict__[cache][1] is not kept
    assert torch.allclose(after.float() - layer.bias, 2 * (before.float() - layer.bias),
                          rtol=0.02, atol=0.02)
    assert set(net.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with torch.no_grad():  # without autocast: plain fp32
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_packing_only_frozen_weights_and_only_where_the_packed_path_is():
    """A trained weight changes in place without a version bump (fused AdamW): a cache keyed
    on the version would compute with the old weight, so trained weights are never packed."""
    layer = nn.Linear(4, 3)
    layer.weight.grad = torch.ones_like(layer.weight)
    version = layer.weight._version
    torch.optim.AdamW([layer.weight], lr=0.5, fused=True).step()
    assert layer.weight._version == version
    assert packed_weights(layer, layer.weight, torch.bfloat16) is None
    layer.weight.requires_grad_(False)
    assert packed_weights(layer, layer.weight, torch.float16) is None
    assert (packed_weights(layer, layer.weight, torch.bfloat16) is not None) == PACKS
    fp32 = packed_weights(layer, layer.weight, torch.float32)  # prediction's layer plans
    assert (fp32 is not None) == frozen.can_pack(torch.float32)
    if fp32 is not None:
        x = torch.randn(5, 4)
        torch.testing.assert_close(linear_packed(x, fp32.matrix, layer.bias), layer(x))


def test_a_3d_output_takes_in_place_additions_as_autocast_s_does():
    """AdaLoRA adds its update into the base layer's output in place: the output must not be
    a view made inside the custom function (autograd forbids modifying those)."""
    plain = frozen_net()
    cached = copy.deepcopy(plain)
    cache_frozen_casts(cached)
    x = torch.randn(2, 5, 16)
    results = []
    for net in (plain, cached):
        extra = torch.ones(32, requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16):
            out = net[0](x)
            out += extra
        out.float().pow(2).sum().backward()
        results.append((out, extra.grad, net[0].bias.grad))
    assert results[1][0].shape == (2, 5, 32)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.skipif(not PACKS, reason="this torch build has no packed oneDNN linear")
def test_models_over_the_same_weights_share_one_layout():
    """`tunelab serve` builds one model per adapter over the shared base's tensors: the base's
    layout is made once, not once per model; a weight of its own gets its own."""
    first = frozen_net()
    second, third = frozen_net(), frozen_net()
    second[0].weight = nn.Parameter(first[0].weight.data, requires_grad=False)  # shared memory
    for net in (first, second, third):
        cache_frozen_casts(net)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            net(torch.randn(2, 16))
    packs = [net[0].__dict__["_pack_cache"][1] for net in (first, second, third)]
    assert packs[0] is packs[1] and packs[2] is not packs[0]
    with torch.no_grad():  # written in place: laid out again, and a newcomer gets the new one
        first[0].weight.mul_(2)
    fourth = frozen_net()
    fourth[0].weight = nn.Parameter(first[0].weight.data, requires_grad=False)
    cache_frozen_casts(fourth)
    x = torch.randn(2, 16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = first(x)
        assert first[0].__dict__["_pack_cache"][1] is not packs[0]
        assert torch.equal(fourth(x), out)
    assert fourth[0].__dict__["_pack_cache"][1] is first[0].__dict__["_pack_cache"][1]


def test_a_module_that_ran_can_be_copied_and_saved():
    """oneDNN's layouts cannot be copied or pickled: a copy or a saved whole module lays its
    weights out again and computes as the original."""
    import io

    net = frozen_net()
    cache_frozen_casts(net)
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = net(x)
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        for other in (copy.deepcopy(net), torch.load(buffer, weights_only=False)):
            assert torch.equal(other(x), want)


def test_a_prediction_plan_is_bit_identical_and_taken_again_on_change():
    """`LinearPlan` (prediction): the general path's output, bit for bit; a written weight or
    bias is taken again; gradients, a trained weight and copies take the general path."""
    net = frozen_net().requires_grad_(False)
    cache_frozen_casts(net)
    planned = frozen.plan_frozen_linears(net)
    assert planned == (2 if PACKS else 0)
    general = copy.deepcopy(net)  # a copy holds no plan
    assert all(m.__dict__.get("_plan") is None for m in general.modules())
    x = torch.randn(2, 5, 16)

    def out(model):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            return model(x)

    assert torch.equal(out(net), out(general))
    if not PACKS:
        return
    plan = net[0].__dict__["_plan"]
    assert plan.key is not None and plan.packed is net[0].__dict__["_pack_cache"][1]
    with torch.no_grad():
        for model in (net, general):
            model[0].weight.mul_(-1)
            model[2].bias.add_(1.0)
    assert torch.equal(out(net), out(general))
    for model in (net, general):  # trained: written without a version bump (as optimizers
        model[0].weight.requires_grad_(True)  # may): the general path, never a stale plan
        model[0].weight.data.mul_(2)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(net(x), general(x))
