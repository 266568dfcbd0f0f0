"""Fused LoRA linear layers: PEFT's function, fewer kernels; PEFT's path wherever it differs."""
import copy
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from tunelab.train.fused_lora import fusable, use_fused_lora

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
           "output.dense"]


def lora_model(tiny_bert, dropout=0.0, **kwargs):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model.config.hidden_dropout_prob = 0.0  # the comparisons run in train mode
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                        modules_to_save=["classifier"], task_type="SEQ_CLS", **kwargs)
    model = get_peft_model(model, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the update would be invisible
            torch.nn.init.normal_(p, std=0.2)
    return model


def loss_and_grads(model, batch, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return {"input_ids": torch.randint(5, 90, (4, 11)), "labels": torch.tensor([0, 1, 1, 0])}


def relative_error(got: dict, want: dict, median: bool = False) -> float:
    errors = sorted(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)
    return errors[len(errors) // 2] if median else errors[-1]


def test_fp32_loss_and_gradients_match_peft(tiny_bert, batch):
    peft_model = lora_model(tiny_bert)
    fused = copy.deepcopy(peft_model)
    assert use_fused_lora(fused) == len(TARGETS) * 2  # tiny_bert has 2 layers
    loss_a, grads_a = loss_and_grads(peft_model, batch, autocast=False)
    loss_b, grads_b = loss_and_grads(fused, batch, autocast=False)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    assert all(g.dtype == torch.float32 for g in grads_b.values())
    assert relative_error(grads_b, grads_a) < 1e-5


def test_bf16_autocast_is_as_close_to_fp32_as_peft_is(tiny_bert, batch):
    peft_model = lora_model(tiny_bert)
    fused = copy.deepcopy(peft_model)
    use_fused_lora(fused)
    _, reference = loss_and_grads(peft_model, batch, autocast=False)
    _, peft_bf16 = loss_and_grads(peft_model, batch, autocast=True)
    _, fused_bf16 = loss_and_grads(fused, batch, autocast=True)
    # per parameter, the median relative error: bf16 rounding is ~2% here for both (a few
    # near-zero gradients, e.g. of keys, have large relative errors in both)
    fused_error = relative_error(fused_bf16, reference, median=True)
    assert fused_error < 0.05
    assert fused_error <= 2 * relative_error(peft_bf16, reference, median=True)


def test_adapters_disabled_or_merged_go_through_peft(tiny_bert, batch):
    model = lora_model(tiny_bert)
    reference = copy.deepcopy(model)
    use_fused_lora(model)
    model.eval()
    reference.eval()
    inputs = {"input_ids": batch["input_ids"]}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reference(**inputs).logits, atol=1e-5)
        with model.disable_adapter(), reference.disable_adapter():
            base = reference(**inputs).logits
            assert torch.allclose(model(**inputs).logits, base, atol=1e-6)
        assert not torch.allclose(model(**inputs).logits, base, atol=1e-3)  # adapters are back
        merged = model.merge_and_unload()
        assert torch.allclose(merged(**inputs).logits, reference(**inputs).logits, atol=1e-5)


def test_the_cached_weight_follows_changes_to_the_base_weight(tiny_bert, batch):
    model = lora_model(tiny_bert)
    use_fused_lora(model)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(3, layer.in_features)
    with torch.autocast("cpu", torch.bfloat16):
        before = layer(x)
        with torch.no_grad():
            layer.base_layer.weight.mul_(2)
        after = layer(x)
    assert not torch.allclose(before.float(), after.float(), atol=1e-2)
    assert "_cast_cache" not in dict(layer.named_buffers())
    assert not any("fused" in key for key in model.state_dict())


def test_only_plain_layers_are_fused_and_the_model_still_pickles(tiny_bert):
    assert use_fused_lora(lora_model(tiny_bert, dropout=0.1)) == 0  # dropout on the branch
    assert use_fused_lora(lora_model(tiny_bert, use_dora=True)) == 0
    model = lora_model(tiny_bert)
    classifier = model.base_model.model.classifier
    assert fusable(classifier) is None  # modules_to_save wrapper, not a LoRA layer
    assert use_fused_lora(model) > 0 and use_fused_lora(model) == 0  # already switched
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone.base_model.model.bert.encoder.layer[0].attention.self.query).__name__ \
        == "FusedLoraLinear"
