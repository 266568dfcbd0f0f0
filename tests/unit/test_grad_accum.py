"""Gradient accumulation must give the same update as one full batch (transformers #37766)."""
import copy
import random

import pytest
import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification

from tunelab.config import RunConfig
from tunelab.methods import registry
from tunelab.tasks import get_task
from tunelab.tasks.classification import Encoded
from tunelab.train.loop import optimizer_step
from tunelab.train.setup import Prepared


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def toy_data(n=8, seed=0):
    rng = random.Random(seed)
    ids = [[2] + [rng.randrange(5, 60) for _ in range(rng.randrange(3, 12))] + [3]
           for _ in range(n)]
    return Encoded(ids, None, [rng.randrange(3) for _ in range(n)], 0)


def one_step(model, data, groups, accum):
    config = RunConfig()
    config.train.grad_accum = accum
    config.train.max_grad_norm = None
    acc = Accelerator(cpu=True)
    p = Prepared(config, get_task(config), acc, None, ["a", "b", "c"], model, None, {"train": data}, 0, False,
                 1.0, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    before = copy.deepcopy(model.state_dict())
    spec = registry.get_method("full")
    loss, items, _ = optimizer_step(p, spec, model, opt, sched, groups)
    delta = {k: before[k] - v for k, v in model.state_dict().items()}
    return loss / items, delta


@pytest.mark.parametrize("split", [[2, 2, 2, 2], [3, 5], [1, 4, 3]])
def test_accumulated_update_equals_full_batch(split):
    data = toy_data()
    full_loss, full_delta = one_step(tiny_model(), data, [list(range(8))], 1)
    groups, start = [], 0
    for size in split:  # uneven micro-batches: a mean of means would be wrong here
        groups.append(list(range(start, start + size)))
        start += size
    acc_loss, acc_delta = one_step(tiny_model(), data, groups, len(split))
    assert acc_loss == pytest.approx(full_loss, rel=1e-5)
    for k in full_delta:
        torch.testing.assert_close(acc_delta[k], full_delta[k], atol=2e-6, rtol=1e-4)
    assert any(v.abs().sum() > 0 for v in full_delta.values())


def test_mean_of_micro_batch_means_would_differ():
    """Guard that the test above can fail: averaging per-micro-batch means is not the same."""
    data = toy_data()
    model = tiny_model()
    logits = model(input_ids=torch.tensor([data.input_ids[0]])).logits
    assert logits.shape == (1, 3)
    import torch.nn.functional as F

    from tunelab.tasks.classification import collate

    def mean_loss(idx):
        b = collate(data, idx, 0)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(out, b["labels"])

    full = mean_loss(list(range(8)))
    naive = (mean_loss([0, 1, 2]) + mean_loss([3, 4, 5, 6, 7])) / 2
    assert abs(float(full) - float(naive)) > 1e-4
