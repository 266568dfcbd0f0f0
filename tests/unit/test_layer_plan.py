"""BERT-family encoder layers predicting through `EncoderLayerPlan`: the general path's logits
bit for bit, the query/key/value projections stacked where they are plain frozen linears, and
the general path wherever the plan does not apply."""
import copy

import pytest
import torch
from conftest import count_outputs
from conftest import padded_inputs as inputs
from transformers import (AutoModelForSequenceClassification, BertConfig, ElectraConfig,
                          MPNetConfig, RobertaConfig, XLMRobertaConfig)

from tunelab.predict import keep_weights_cast, keep_weights_fp32
from tunelab.train import frozen, layer_plan
from tunelab.train.layer_plan import EncoderLayerPlan

pytestmark = pytest.mark.skipif(not frozen._can_pack(),
                                reason="no packed bf16 matmul on this CPU: nothing is planned")
SIZES = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)
CONFIGS = {"bert": BertConfig, "roberta": RobertaConfig, "xlm_roberta": XLMRobertaConfig,
           "electra": ElectraConfig}


def build(family="bert", attention="sdpa"):
    torch.manual_seed(0)
    config = CONFIGS[family](**SIZES, num_labels=3)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)


def logits(model, batch, grad=False, **kwargs):
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**batch, **kwargs).logits.float().detach()


def general(model):
    """`model` without its layer plans (a copy holds none): the path every call took before
    them (each linear through its own plan, as in `model`)."""
    from tunelab.train.fused_lora import fold_lora_layers

    copied = copy.deepcopy(model)
    if any(getattr(m.__dict__.get("_plan"), "fold", False) for m in model.modules()):
        fold_lora_layers(copied)
    return copied


def lora_model(targets=("query", "key", "value")):
    """A tiny BERT with LoRA on `targets`, B drawn at random (not PEFT's zeros), prepared for
    bf16 prediction."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8,
                                                    target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    return keep_weights_cast(peft_model).eval()


@pytest.fixture
def planned_calls(monkeypatch):
    """Per layer call, whether the plan computed it."""
    return count_outputs(monkeypatch, EncoderLayerPlan)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("padded", [True, False])
def test_planned_layers_predict_the_general_paths_logits(family, padded, planned_calls):
    model = keep_weights_cast(build(family)).eval()
    layers = [m for m in model.modules() if isinstance(m, layer_plan._Planned)]
    assert len(layers) == SIZES["num_hidden_layers"]
    batch = inputs(padded)
    got = logits(model, batch)
    assert planned_calls == [True] * len(layers)
    assert torch.equal(got, logits(general(model), batch))
    plan = layers[0].__dict__["_plan"]
    stacked = plan.routes[0]  # the query, key and value weights as one
    assert isinstance(stacked, layer_plan._Packed) and stacked.bias.shape == (3 * 32,)
    # the plan is no different function: in fp32 (no plan) the same model is within bf16's reach
    with torch.no_grad():
        fp32 = model(**batch).logits
    assert torch.allclose(got, fp32, atol=0.1 * fp32.abs().max().item())


@pytest.mark.skipif(not frozen.can_pack(torch.float32), reason="no oneDNN fp32 layout here")
@pytest.mark.parametrize("padded", [True, False])
def test_fp32_layers_compute_over_weights_laid_out_in_fp32(padded, planned_calls):
    from peft import LoraConfig, get_peft_model

    model = keep_weights_fp32(build()).eval()
    batch = inputs(padded)
    with torch.no_grad():
        got = model(**batch).logits
        want = general(model)(**batch).logits
    assert planned_calls == [True, True]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # oneDNN's matmul, not MKL's
    stacked = model.bert.encoder.layer[0].__dict__["_plan"].routes[0]
    assert stacked.matrix.dtype == torch.float32 and stacked.bias.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the same plan in bf16
        assert torch.equal(model(**batch).logits, general(model)(**batch).logits)
    assert planned_calls[2:] == [True, True]
    lora = get_peft_model(build(), LoraConfig(r=4, target_modules=["query", "value"]))
    lora = keep_weights_fp32(lora).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(**batch).logits, general(lora)(**batch).logits,
                                   rtol=1e-5, atol=1e-5)
    plan = lora.base_model.model.bert.encoder.layer[0].__dict__["_plan"]
    assert isinstance(plan.routes[0], tuple)  # LoRA's query and value: their own modules
    planned_calls.clear()
    with torch.no_grad():  # traced (ONNX export): the general path, whose ops export
        traced = torch.jit.trace(lambda ids, mask: model(input_ids=ids, attention_mask=mask)
                                 .logits, (batch["input_ids"], batch["attention_mask"]),
                                 check_trace=False)
    assert planned_calls == [] and "mkldnn" not in str(traced.graph)


def test_a_written_projection_is_stacked_again(planned_calls):
    model = keep_weights_cast(build()).eval()
    batch = inputs()
    before = logits(model, batch)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.key.weight.mul_(-2)
    after = logits(model, batch)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.equal(after, logits(general(model), batch))
    assert all(planned_calls)


def test_lora_layers_kept_apart_and_folded_compute_through_their_own_plans(planned_calls):
    from tunelab.train.fused_lora import fold_lora_layers

    def lora():
        return lora_model(("query", "value"))

    batch = inputs()
    apart = lora()
    got = logits(apart, batch)
    assert all(planned_calls) and len(planned_calls) == 2
    assert torch.equal(got, logits(general(apart), batch))
    plan = apart.base_model.model.bert.encoder.layer[0].__dict__["_plan"]
    assert isinstance(plan.routes[0], tuple)  # LoRA members compute apart
    folded = lora()
    fold_lora_layers(folded)
    assert torch.equal(logits(folded, batch), logits(general(folded), batch))
    assert not torch.allclose(logits(folded, batch), logits(build().eval(), batch), atol=1e-3)


def test_folded_query_key_and_value_are_one_matmul_over_their_folds(planned_calls):
    from tunelab.train.fused_lora import fold_lora_layers

    model = lora_model()
    fold_lora_layers(model)
    batch = inputs()
    got = logits(model, batch)
    assert planned_calls == [True, True]
    assert torch.equal(got, logits(general(model), batch))
    layer = model.base_model.model.bert.encoder.layer[0]
    stacked = layer.__dict__["_plan"].routes[0]
    assert isinstance(stacked, layer_plan._Packed) and stacked.bias.shape == (3 * 32,)
    query = layer.attention.self.query
    assert query.__dict__["_plan"].matrix is None  # released: the stack holds it
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # called on its own
        alone = query(torch.ones(1, 2, 32))
        assert query.__dict__["_plan"].matrix is not None  # folded again
        assert torch.allclose(alone.float(), query.base_layer(torch.ones(1, 2, 32)).float()
                              + query.get_delta_weight("default").sum(1), atol=0.1)
    with torch.no_grad():  # an adapter written: stacked again
        layer.attention.self.key.lora_B["default"].weight.mul_(-1)
    again = logits(model, batch)
    assert not torch.allclose(again, got, atol=1e-3)
    assert torch.equal(again, logits(general(model), batch))


def test_lora_query_key_and_value_kept_apart_are_one_stack(planned_calls, monkeypatch):
    from tunelab.train import fused_lora

    lora = lora_model
    first, second = lora(), lora()  # two runs' models over one base (as `tunelab serve`)
    batch = inputs()
    got = logits(first, batch)
    assert planned_calls == [True, True]
    assert torch.equal(got, logits(general(first), batch))
    logits(second, batch)
    stacks = [m.base_model.model.bert.encoder.layer[0].__dict__["_plan"].routes[0]
              for m in (first, second)]
    assert all(isinstance(s, layer_plan._LoraStack) for s in stacks)
    assert stacks[0].matrix is not stacks[1].matrix  # separate bases here ...
    shared = lora()
    for a, b in zip(shared.base_model.model.bert.encoder.layer,
                    first.base_model.model.bert.encoder.layer):
        for name in ("query", "key", "value"):  # ... one base, as the server shares it
            getattr(a.attention.self, name).base_layer.weight = \
                getattr(b.attention.self, name).base_layer.weight
    logits(shared, batch)
    assert shared.base_model.model.bert.encoder.layer[0].__dict__["_plan"].routes[0].matrix \
        is stacks[0].matrix
    monkeypatch.setattr(fused_lora, "SUM_ROWS", 0)  # many rows: the update added in place
    assert torch.equal(logits(first, batch), got)
    monkeypatch.undo()
    with torch.no_grad():  # an adapter written: stacked again
        first.base_model.model.bert.encoder.layer[0].attention.self.key \
            .lora_A["default"].weight.mul_(-1)
    again = logits(first, batch)
    assert not torch.allclose(again, got, atol=1e-3)
    assert torch.equal(again, logits(general(first), batch))


def test_the_general_path_wherever_the_plan_does_not_apply(planned_calls):
    model = keep_weights_cast(build()).eval()
    batch = inputs()
    want = logits(general(model), batch)
    assert torch.equal(logits(model, batch, grad=True), want)  # gradients: explain
    assert planned_calls == []
    seen = []
    dense = model.bert.encoder.layer[1].intermediate.dense
    handle = dense.register_forward_hook(lambda *a: seen.append(1))
    logits(model, batch)
    assert seen == [1] and planned_calls == [True, False]  # the hooked layer ran its modules
    handle.remove()
    planned_calls.clear()
    model.train()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch)
    assert planned_calls == [False, False]
    model.eval()
    planned_calls.clear()
    assert torch.equal(logits(copy.deepcopy(model), batch), want)  # a copy holds no plan
    assert planned_calls == []
    hidden = logits(model, batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        states = model(**batch, output_hidden_states=True).hidden_states
        general_states = general(model)(**batch, output_hidden_states=True).hidden_states
    assert torch.equal(hidden, want) and len(states) == 3
    assert all(torch.equal(a, b) for a, b in zip(states, general_states))


def test_only_the_bert_family_with_sdpa_is_planned():
    assert layer_plan.plan_encoder_layers(build(attention="eager")) == 2  # planned, ...
    eager = keep_weights_cast(build(attention="eager")).eval()
    layer = eager.bert.encoder.layer[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.__dict__["_plan"].output(layer, torch.ones(1, 3, 32), None) is None  # unused
    torch.manual_seed(0)
    mpnet = AutoModelForSequenceClassification.from_config(MPNetConfig(**SIZES))
    assert layer_plan.plan_encoder_layers(mpnet) == 0
    replaced = build()
    replaced.bert.encoder.layer[0].output.forward = lambda *a: None  # a method's own forward
    assert layer_plan.plan_encoder_layers(replaced) == 1
