"""Llama-family decoder layers predicting and generating through `DecoderLayerPlan`: the
general path's logits and text, and the general path wherever the plan does not apply."""
import copy

import pytest
import torch
from conftest import count_outputs
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.predict import keep_weights_cast
from tunelab.train import frozen
from tunelab.train.decoder_plan import DecoderLayerPlan

pytestmark = pytest.mark.skipif(not frozen._can_pack(),
                                reason="no packed bf16 matmul on this CPU: nothing is planned")


def build(attention="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=0.3)
    return LlamaForCausalLM._from_config(config, attn_implementation=attention)


@pytest.fixture
def planned_calls(monkeypatch):
    """Per layer call, whether the plan computed it."""
    return count_outputs(monkeypatch, DecoderLayerPlan)


def general(model):
    return copy.deepcopy(model)  # a copy holds no plans


def run(model, grad=False):
    ids = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generation pads
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step = model(input_ids=first.logits[:, -1].argmax(-1, keepdim=True),
                     attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                     cache=first.past_key_values, use_cache=True)
        return first.logits.float().detach(), step.logits.float().detach()


def test_planned_layers_predict_and_generate_as_the_general_path(planned_calls):
    model = keep_weights_cast(build()).eval()
    got = run(model)
    assert planned_calls == [True] * 4  # two layers, prompt and one cached step
    want = run(general(model))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    plan = model.model.layers[0].__dict__["_plan"]
    assert all(type(plan.routes[i]).__name__ == "_Packed" for i in (0, 2))  # stacked
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        text = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(text, general(model).generate(ids, max_new_tokens=6, do_sample=False))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(-1)  # written: stacked again
    changed = run(model)
    assert not torch.equal(changed[0], got[0])
    assert all(torch.equal(a, b) for a, b in zip(changed, run(general(model))))


def test_the_general_path_wherever_the_plan_does_not_apply(planned_calls):
    model = keep_weights_cast(build()).eval()
    want = run(general(model))
    assert all(torch.equal(a, b) for a, b in zip(run(model, grad=True), want))
    assert planned_calls == []
    seen = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: seen.append(1))
    run(model)
    assert seen == [1, 1] and planned_calls == [False, True, False, True]
    handle.remove()
    eager = keep_weights_cast(build(attention="eager")).eval()
    planned_calls.clear()
    run(eager)
    assert planned_calls == [False] * 4
