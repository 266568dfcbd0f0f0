"""Frozen sibling projections of one input computed as one matmul while training
(`tunelab.train.grouped`): the same outputs and gradients as each layer alone, up to bf16
rounding, and each layer alone wherever the group does not fit."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from tunelab.train import frozen, grouped
from tunelab.train.frozen import cache_frozen_casts
from tunelab.train.fused_lora import fuse_lora_layers
from tunelab.train.grouped import group_projections

pytestmark = pytest.mark.skipif(not frozen._can_pack(),
                                reason="this torch build has no packed oneDNN linear")


def bert(tiny_bert, **lora):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, **lora))
        with torch.no_grad():  # LoRA's B starts at 0: give the adapter something to say
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def set_up(model) -> int:
    """As `tunelab train` sets a model up; the number of groups."""
    fuse_lora_layers(model)
    cache_frozen_casts(model)
    return group_projections(model)


def loss_and_grads(model, group: bool, bf16: bool = True, labels=True):
    ids = torch.randint(5, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = torch.tensor([0, 1, 1, 0]) if labels else ids
    grouped.GROUP = group
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.eval()(**batch).loss
    finally:
        grouped.GROUP = True
    if loss.requires_grad:  # not with every adapter disabled
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def count_calls(monkeypatch) -> list:
    calls = []
    apply = grouped.GroupedLinearFunction.apply
    monkeypatch.setattr(grouped.GroupedLinearFunction, "apply",
                        lambda *a: calls.append(a[2]) or apply(*a))
    return calls


def assert_as_close_as_alone(model, calls, groups_per_pass, labels=True):
    """Grouped, the loss and every gradient are as close to fp32's as each layer alone gives
    (bf16 rounds the sums in another order, so not bit-identical)."""
    want_loss, want = loss_and_grads(model, False, bf16=False, labels=labels)
    alone_loss, alone = loss_and_grads(model, False, labels=labels)
    assert not calls
    loss, got = loss_and_grads(model, True, labels=labels)
    assert len(calls) == groups_per_pass
    assert abs(loss - want_loss) <= 2 * abs(alone_loss - want_loss) + 1e-3
    assert got.keys() == want.keys()
    for name, grad in want.items():
        alone_error = (alone[name] - grad).norm()
        assert (got[name] - grad).norm() <= 2 * alone_error + 2e-3 * grad.norm(), name


def test_lora_on_query_key_value_is_one_matmul_per_layer(tiny_bert, monkeypatch):
    model = bert(tiny_bert, target_modules=["query", "key", "value", "dense"])
    assert set_up(model) == 2  # the tiny BERT's two attention blocks
    calls = count_calls(monkeypatch)
    assert_as_close_as_alone(model, calls, 2)
    assert all(len(layout) == 3 and all(s is not None for _, _, s in layout)
               for layout in calls)
    # a slip in which member gets which slice of the stacked output is no bf16 rounding
    assert torch.allclose(loss_and_grads(model, True)[0], loss_and_grads(model, False)[0],
                          rtol=1e-2)


def test_plain_frozen_members_and_trained_biases(tiny_bert, monkeypatch):
    """LoRA on query and value only (key is a frozen linear), and BitFit's trained biases: the
    biases' gradients come from the grouped backward."""
    model = bert(tiny_bert, target_modules=["query", "value"])
    for name, p in model.named_parameters():
        if "attention.self" in name and name.endswith("bias"):
            p.requires_grad_(True)
    assert set_up(model) == 2
    calls = count_calls(monkeypatch)
    assert_as_close_as_alone(model, calls, 2)
    assert [s is not None for _, _, s in calls[0]] == [True, False, True]
    assert all(has_bias for _, has_bias, _ in calls[0])


def test_members_that_do_not_fit_compute_alone(tiny_bert, monkeypatch):
    """LoRA dropout, a trained weight, disabled adapters: each layer alone, as without groups."""
    calls = count_calls(monkeypatch)
    with_dropout = bert(tiny_bert, target_modules=["query", "key", "value"], lora_dropout=0.1)
    assert set_up(with_dropout) == 2
    loss_and_grads(with_dropout, True)
    assert not calls
    lora = bert(tiny_bert, target_modules=["query", "key", "value"])
    set_up(lora)
    with lora.disable_adapter():
        loss_and_grads(lora, True)
    assert not calls
    full = bert(tiny_bert)
    assert set_up(full) == 0  # trained weights are not `CachedCastLinear`s
    frozen_then_trained = bert(tiny_bert, target_modules=["value"])
    set_up(frozen_then_trained)
    frozen_then_trained.base_model.model.bert.encoder.layer[0].attention.self.key.weight \
        .requires_grad_(True)
    loss_and_grads(frozen_then_trained, True)
    assert len(calls) == 1  # layer 1 only


def test_decoder_attention_and_gated_mlp_with_fewer_key_value_heads(monkeypatch):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    assert set_up(model) == 4  # (q, k, v) and (gate, up) in each of 2 layers
    calls = count_calls(monkeypatch)
    assert_as_close_as_alone(model, calls, 4, labels=False)
    assert sorted(tuple(n for n, _, _ in layout) for layout in calls[:2]) == [(32, 16, 16),
                                                                               (48, 48)]


def test_prediction_copies_and_changed_weights(tiny_bert):
    """Under inference mode (evaluation) the group still serves its members; a copy of a model
    that ran computes as it does; a frozen weight written in place is laid out again."""
    model = bert(tiny_bert, target_modules=["query", "key", "value"])
    set_up(model)
    ids = torch.randint(5, 100, (3, 8), generator=torch.Generator().manual_seed(2))

    def encode(m, group=True):
        grouped.GROUP = group
        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = m.eval()(input_ids=ids, output_hidden_states=True)
                return out.hidden_states[-1].float()
        finally:
            grouped.GROUP = True

    want = encode(model, group=False)
    assert torch.allclose(encode(model), want, atol=5e-2)
    assert torch.allclose(encode(copy.deepcopy(model)), want, atol=5e-2)
    value = model.base_model.model.bert.encoder.layer[1].attention.self.value.base_layer
    with torch.no_grad():
        value.weight.mul_(50)
    changed = encode(model, group=False)
    assert not torch.allclose(changed, want, atol=0.2)
    assert torch.allclose(encode(model), changed, atol=5e-2)


def test_gradient_checkpointing_recomputes_the_group(tiny_bert, monkeypatch):
    """Recomputed in backward (non-reentrant checkpointing), the group gives the gradients it
    gives without checkpointing."""
    model = bert(tiny_bert, target_modules=["query", "key", "value"])
    set_up(model)
    calls = count_calls(monkeypatch)
    loss, want = loss_and_grads(model, True)
    assert len(calls) == 2
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for module in model.modules():  # no dropout: the same function as in eval mode
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids = torch.randint(5, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0])).loss
    again.backward()
    assert len(calls) == 2 + 4  # forward, and the recomputation in backward
    assert torch.equal(again.detach(), loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, want[name]), name
