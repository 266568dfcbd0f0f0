"""MPNet encoder layers predicting through `MPNetLayerPlan`: the general path's logits bit for
bit in bf16 (to fp32's rounding in fp32), padded or not, merged or with LoRA folded, and the
general path where attention weights are asked for or a part is hooked."""
import copy

import pytest
import torch
from conftest import count_outputs
from conftest import padded_inputs as inputs
from transformers import AutoModelForSequenceClassification, MPNetConfig

from tunelab.predict import keep_weights_cast, keep_weights_fp32
from tunelab.train import frozen
from tunelab.train.mpnet_plan import MPNetLayerPlan

pytestmark = pytest.mark.skipif(not frozen._can_pack(),
                                reason="no packed bf16 matmul on this CPU: nothing is planned")
SIZES = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)


def build():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(MPNetConfig(**SIZES, num_labels=3))


def logits(model, batch, bf16=True, **kwargs):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(**batch, **kwargs).logits.float()


@pytest.fixture
def planned_calls(monkeypatch):
    return count_outputs(monkeypatch, MPNetLayerPlan)


@pytest.mark.parametrize("padded", [True, False])
def test_planned_mpnet_layers_predict_the_general_paths_logits(padded, planned_calls):
    model = keep_weights_cast(build()).eval()
    batch = inputs(padded)
    got = logits(model, batch)
    assert planned_calls == [True, True]
    assert torch.equal(got, logits(copy.deepcopy(model), batch))  # a copy holds no plan
    assert planned_calls == [True, True]
    stacked = model.mpnet.encoder.layer[0].__dict__["_plan"].routes[0]
    assert stacked.bias.shape == (3 * 32,)
    with torch.no_grad():
        fp32 = model(**batch).logits  # fp32 without autocast: laid out in fp32 where it can
    assert torch.allclose(got, fp32, atol=0.1 * fp32.abs().max().item())
    if frozen.can_pack(torch.float32):
        torch.testing.assert_close(logits(model, batch, bf16=False),
                                   logits(copy.deepcopy(model), batch, bf16=False),
                                   rtol=1e-5, atol=1e-5)
    planned_calls.clear()
    with torch.no_grad():  # attention weights asked for: the general path gives them
        with_weights = model(**batch, output_attentions=True)
        general = copy.deepcopy(model)(**batch)
    assert planned_calls == [] and len(with_weights.attentions) == 2
    assert torch.equal(with_weights.logits, general.logits)


def test_lora_folded_and_hooks(planned_calls):
    from peft import LoraConfig, get_peft_model

    from tunelab.train.fused_lora import fold_lora_layers

    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8,
                                                    target_modules=["q", "k", "v", "o"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    model = keep_weights_cast(peft_model).eval()
    batch = inputs()
    apart = logits(model, batch)
    assert planned_calls == [True, True]
    assert torch.equal(apart, logits(copy.deepcopy(model), batch))
    stacked = model.base_model.model.mpnet.encoder.layer[0].__dict__["_plan"].routes[0]
    assert type(stacked).__name__ == "_LoraStack"  # kept apart: q, k and v stacked
    reference = copy.deepcopy(model)
    fold_lora_layers(model)
    fold_lora_layers(reference)
    folded = logits(model, batch)
    assert torch.equal(folded, logits(reference, batch))
    assert not torch.allclose(folded, logits(build().eval(), batch), atol=1e-3)
    planned_calls.clear()
    layer = model.base_model.model.mpnet.encoder.layer[1]
    handle = layer.intermediate.dense.register_forward_hook(lambda *a: None)
    assert torch.equal(logits(model, batch), folded)
    assert planned_calls == [True, False]  # the hooked layer ran its modules
    handle.remove()


def test_fp32_predictor_plans_mpnet():
    model = keep_weights_fp32(build())
    assert all(not p.requires_grad for p in model.parameters())
    planned = [type(m).__name__ for m in model.modules() if "_plan" in m.__dict__
               and isinstance(m.__dict__["_plan"], MPNetLayerPlan)]
    assert planned == ["PlannedMPNetLayer"] * 2
