"""Fast dropout: torch's dropout function with masks from 16-bit lanes of 64-bit draws."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tunelab.train.dropout import (ATTENTION, BF16_SCORES_FROM, FastDropout, bert_eager_attention,
                                   fast_dropout, use_fast_dropout)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drops_with_probability_p_in_every_lane_and_scales_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(400, 1000) + 0.5  # no zeros of its own
    y = fast_dropout(x, p)
    dropped = y == 0
    n = x.numel()
    tolerance = 5 * (p * (1 - p) / (n / 4)) ** 0.5  # 5 sigma for each quarter
    for lane in range(4):  # each 16-bit lane of a 64-bit draw, the top one included
        assert dropped.view(-1, 4)[:, lane].float().mean().item() == pytest.approx(p, abs=tolerance)
    assert torch.equal(y[~dropped], x[~dropped] * (1 / (1 - p)))


def test_neighbouring_elements_are_dropped_independently():
    torch.manual_seed(1)
    dropped = (fast_dropout(torch.ones(1_000_000), 0.5) == 0).float()
    both = (dropped[:-1] * dropped[1:]).mean().item()  # P(both) = 0.25 if independent
    assert both == pytest.approx(0.25, abs=0.005)


def test_repeatable_under_torch_manual_seed_and_identity_when_off():
    x = torch.randn(64, 48)
    torch.manual_seed(3)
    a = fast_dropout(x, 0.2)
    torch.manual_seed(3)
    b = fast_dropout(x, 0.2)
    c = fast_dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert fast_dropout(x, 0.2, training=False) is x and fast_dropout(x, 0.0) is x
    assert fast_dropout(torch.ones(7, 3), 0.5).shape == (7, 3)  # 21 elements: 6 draws
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fast_dropout(x, 1.0)


def test_bf16_keeps_its_dtype_and_gradients_follow_the_mask():
    x = torch.randn(32, 27, 384, dtype=torch.bfloat16, requires_grad=True)
    y = fast_dropout(x, 0.1)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    kept = y != 0
    want = torch.where(kept, torch.tensor(1 / 0.9, dtype=torch.bfloat16), 0)
    assert torch.equal(x.grad, want)
    module = FastDropout(0.1)
    assert isinstance(module, nn.Dropout) and module.eval()(x) is x


def test_a_bert_model_gets_fast_dropout_everywhere_and_answers_as_before(tiny_bert):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        m.set_attn_implementation("eager")
    dropouts = sum(type(m) is nn.Dropout for m in model.modules())
    assert use_fast_dropout(model) == dropouts + 1  # + the attention probabilities
    assert model.config._attn_implementation == ATTENTION
    assert not any(type(m) is nn.Dropout for m in model.modules())
    ids = torch.randint(5, 100, (4, 12))
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits,
                           reference(ids, attention_mask=mask).logits)
    model.train()
    for m in model.modules():  # dropout on the attention probabilities only
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.bert.encoder.layer[0].attention.self.dropout.p = 0.5
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    probabilities = out.attentions[0][:2]  # rows without padding
    dropped = (probabilities == 0).float().mean().item()
    assert 0.35 < dropped < 0.65  # 2 x 2 heads x 12 x 12 entries, each dropped with p = 0.5
    assert torch.allclose(probabilities.sum(-1).mean(), torch.tensor(1.0), atol=0.2)


def test_other_attention_is_left_alone_and_peft_models_are_reached(tmp_path):
    from peft import LoraConfig, get_peft_model

    from tunelab.models import build_tiny_model

    llama = AutoModelForCausalLM.from_pretrained(
        build_tiny_model(tmp_path / "llama", kind="llama", vocab_size=200, hidden=32,
                         texts=["one two three four"] * 20))
    llama.set_attn_implementation("eager")
    assert use_fast_dropout(llama) == 0  # no nn.Dropout, and attention is not BERT's
    assert llama.config._attn_implementation == "eager"
    bert = build_tiny_model(tmp_path / "bert", kind="bert", vocab_size=120,
                            texts=["one two three four"] * 20)
    model = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2)
    model.set_attn_implementation("eager")
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"],
                                               lora_dropout=0.1))
    assert use_fast_dropout(wrapped) > 0
    assert model.config._attn_implementation == ATTENTION
    assert isinstance(wrapped.base_model.model.bert.encoder.layer[0].attention.self.query
                      .lora_dropout["default"], FastDropout)


@pytest.mark.parametrize("length", [BF16_SCORES_FROM - 8, BF16_SCORES_FROM + 8])
def test_attention_under_bf16_autocast_matches_fp32_and_masks_padding(length):
    """Long rows keep the scores in bf16 (the fp32 mask is cast, its -inf clamped), short rows
    go through fp32 as transformers does; both agree with fp32 attention and give padded keys
    no weight, in the forward pass and in the gradients; a row with every key masked is
    uniform, not NaN, as in fp32."""
    from types import SimpleNamespace

    from transformers.models.bert.modeling_bert import eager_attention_forward

    torch.manual_seed(0)
    module = SimpleNamespace(training=True)
    q, k, v = (torch.randn(2, 4, length, 16, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, length, length)
    mask[1, :, :, length - 5:] = torch.finfo(torch.float32).min  # 5 padded keys
    mask[0, :, 0, :] = torch.finfo(torch.float32).min  # a row with every key masked: uniform
    with torch.autocast("cpu", torch.bfloat16):
        out, probs = bert_eager_attention(module, q, k, v, mask)
    assert probs.dtype == (torch.bfloat16 if length >= BF16_SCORES_FROM else torch.float32)
    assert torch.isfinite(probs).all() and (probs[1, :, :, length - 5:] == 0).all()
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    assert (grads[2][1, :, length - 5:] == 0).all()  # padded values get no gradient
    for t in (q, k, v):
        t.grad = None
    want, _ = eager_attention_forward(module, q, k, v, mask, scaling=16 ** -0.5)
    want.square().sum().backward()
    assert torch.allclose(out.float(), want, atol=0.03, rtol=0.03)
    for got, t in zip(grads, (q, k, v)):
        assert torch.allclose(got, t.grad, atol=0.05 * t.grad.abs().max().item())
