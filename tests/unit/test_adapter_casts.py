"""Under bf16 autocast, PEFT layers need not cast their input to fp32: same loss, same
gradients, bit for bit."""
import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from tunelab.train.setup import skip_adapter_input_casts


@pytest.mark.parametrize("make", [
    lambda: LoraConfig(r=4, target_modules=["query", "value", "dense"], lora_dropout=0.0),
    lambda: IA3Config(target_modules=["key", "value", "output.dense"],
                      feedforward_modules=["output.dense"])])
def test_skipping_the_input_casts_changes_nothing(tiny_bert, make):
    ids = torch.randint(5, 100, (4, 10))
    labels = torch.tensor([0, 1, 1, 0])
    results = []
    for skip in (False, True):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        model = get_peft_model(base, make())
        with torch.no_grad():  # LoRA's B starts at 0: give the adapter something to say
            for name, p in model.named_parameters():
                if "lora_B" in name or "ia3" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        model.eval()  # no dropout: the two runs must be comparable
        if skip:
            assert skip_adapter_input_casts(model) > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 2
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
