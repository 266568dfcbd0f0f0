"""LoRA's update added inside the matmul (`FusedLinear`, `LoraLinearFunction`): PEFT's
function, gradients and saved adapter; PEFT's own forward wherever the fused path does not
apply."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from tunelab.train import fused_lora
from tunelab.train.fused_lora import fuse_lora_layers


def lora_model(tiny_bert, lora_dropout=0.0, **settings):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, lora_dropout=lora_dropout,
                                            target_modules=["query", "value", "dense"], **settings))
    with torch.no_grad():  # LoRA's B starts at 0: give the adapter something to say
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def loss_and_grads(model, bf16, backward=True):
    ids = torch.randint(5, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0])).loss
    if not backward:
        return loss.detach(), {}
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_fused_layers_compute_peft_lora(tiny_bert, lora_dropout, monkeypatch):
    """In fp32 the same loss and gradients; under bf16 autocast as close to fp32 as PEFT's.
    Without LoRA dropout the layers are `LoraLinearFunction` (its own backward), with it the
    `addmm` into the base output (in eval mode here, so that the dropout draws nothing)."""
    from peft.tuners.lora.layer import Linear

    calls = []
    apply = fused_lora.LoraLinearFunction.apply
    monkeypatch.setattr(fused_lora.LoraLinearFunction, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    peft_model = lora_model(tiny_bert, lora_dropout)
    fused = lora_model(tiny_bert, lora_dropout)
    lora_layers = [m for m in fused.modules() if type(m) is Linear]
    assert fuse_lora_layers(fused) == len(lora_layers) > 4
    assert all(type(m).__name__ == "FusedLinear" and isinstance(m, Linear) for m in lora_layers)
    loss_a, grads_a = loss_and_grads(peft_model, False)
    assert not calls
    loss_b, grads_b = loss_and_grads(fused, False)
    assert len(calls) == (len(lora_layers) if lora_dropout == 0 else 0)
    assert loss_b == pytest.approx(loss_a.item(), rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    for name, want in grads_a.items():
        assert torch.allclose(grads_b[name], want, rtol=1e-4, atol=1e-4 * want.abs().max()), name
    loss_pb, grads_pb = loss_and_grads(peft_model, True)
    loss_fb, grads_fb = loss_and_grads(fused, True)
    assert abs(loss_fb - loss_a) <= 2 * abs(loss_pb - loss_a) + 1e-3
    for name, want in grads_a.items():
        peft_error = (grads_pb[name] - want).norm()
        assert (grads_fb[name] - want).norm() <= 2 * peft_error + 1e-3 * want.norm(), name
    assert fused.state_dict().keys() == peft_model.state_dict().keys()


def test_other_cases_are_peft_s_own_forward(tiny_bert):
    """Disabled or merged adapters, and a LoRA bias (which PEFT scales too), go through PEFT."""
    reference = lora_model(tiny_bert, lora_bias=True)
    fused = lora_model(tiny_bert, lora_bias=True)
    fused.load_state_dict(reference.state_dict())
    assert fuse_lora_layers(fused) > 0
    for model in (reference, fused):
        for name, p in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(2))
    loss_a, _ = loss_and_grads(reference, False)
    loss_b, _ = loss_and_grads(fused, False)
    assert loss_b == pytest.approx(loss_a.item(), rel=1e-5)
    with fused.disable_adapter(), reference.disable_adapter():
        assert loss_and_grads(fused, False, backward=False)[0] == pytest.approx(
            loss_and_grads(reference, False, backward=False)[0].item(), rel=1e-5)


def test_a_bf16_base_with_fp32_adapters_sums_as_peft_does(tiny_bert):
    """Without autocast, PEFT's `+` promotes a bf16 base output and an fp32 update to fp32."""
    models = []
    for fuse in (False, True):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2,
                                                                  dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
        if fuse:
            assert fuse_lora_layers(model) > 0
        models.append(model.eval())
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = (m(input_ids=ids).logits for m in models)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=2e-2)


@pytest.mark.parametrize("pack", [False, True])
def test_frozen_base_weights_cast_or_packed_once_change_nothing(tiny_bert, monkeypatch, pack):
    """Under bf16 autocast with the frozen base weights kept cast (and on CPU packed for
    oneDNN), the LoRA step's loss and gradients are bit-identical to casting at every call."""
    from tunelab.train import frozen

    monkeypatch.setattr(frozen, "PACK_WEIGHTS", pack)
    every_call = lora_model(tiny_bert)
    kept = lora_model(tiny_bert)
    fuse_lora_layers(every_call), fuse_lora_layers(kept)
    assert frozen.cache_frozen_casts(kept) > 4
    loss_a, grads_a = loss_and_grads(every_call, True)
    for _ in range(2):  # the second step from the kept copies
        loss_b, grads_b = loss_and_grads(kept, True)
        assert torch.equal(loss_a, loss_b)
        assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    bases = [m.base_layer for m in kept.modules() if type(m).__name__ == "FusedLinear"]
    assert all(("_pack_cache" in b.__dict__) == (pack and frozen._can_pack()) for b in bases)


def test_prediction_keeps_lora_apart_in_fused_layers(tiny_bert, monkeypatch):
    """`keep_weights_cast` (bf16 prediction with the adapter unmerged: `tunelab serve`,
    `merge=False`) computes LoRA layers in their fused form, with the frozen A and B laid out
    once: as close to fp32 as PEFT's own forward; a changed adapter weight is laid out again."""
    from tunelab.predict import keep_weights_cast

    peft_model = lora_model(tiny_bert).eval()
    fused = keep_weights_cast(lora_model(tiny_bert)).eval()
    layers = [m for m in fused.modules() if type(m).__name__ == "FusedLinear"]
    assert layers
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(3))

    def logits(model, bf16=True):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=ids).logits.float()

    want, peft_bf16, got = logits(peft_model, bf16=False), logits(peft_model), logits(fused)
    assert (got - want).abs().max() <= 2 * (peft_bf16 - want).abs().max() + 1e-3
    plan = layers[0].__dict__["_plan"]
    kept = plan.b_laid  # B laid out once for oneDNN
    assert kept.dtype == torch.bfloat16 and logits(fused).equal(got) and plan.b_laid is kept
    monkeypatch.setattr(fused_lora, "SUM_ROWS", 0)  # many rows: the update added in place
    assert logits(fused).equal(got)
    monkeypatch.undo()
    with torch.no_grad():
        for model in (peft_model, fused):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1)
    assert plan.b_laid is kept  # not yet called
    flipped = logits(fused)
    assert plan.b_laid is not kept  # written: laid out again
    assert not torch.allclose(flipped, got, atol=1e-3)
    assert (flipped - logits(peft_model, bf16=False)).abs().max() \
        <= 2 * (logits(peft_model) - logits(peft_model, bf16=False)).abs().max() + 1e-3


def test_folded_layers_predict_as_the_merged_model(tiny_bert, monkeypatch):
    """Prediction plans (`LoraPlan`): kept apart, bit-identical to the general path; folded
    (`fold_lora_layers`: `tunelab serve`, a run alone on its base), each frozen LoRA layer is
    one packed matmul over `W + (B A) s`, predicting bit-identically to PEFT's merge on the same
    bf16 path; an adapter written in place is folded again; gradients, a trained adapter and
    copies take the general path; unfolding restores the plan kept apart."""
    import copy

    from tunelab.predict import keep_weights_cast
    from tunelab.train import frozen
    from tunelab.train.fused_lora import fold_lora_layers, unfold_lora_layers

    calls = []
    unfolded_call = fused_lora.lora_linear
    monkeypatch.setattr(fused_lora, "lora_linear", lambda *a: calls.append(1) or unfolded_call(*a))
    merged = keep_weights_cast(lora_model(tiny_bert).merge_and_unload()).eval()
    folded = keep_weights_cast(lora_model(tiny_bert)).eval()
    apart = keep_weights_cast(lora_model(tiny_bert)).eval()
    layers = [m for m in folded.modules() if type(m).__name__ == "FusedLinear"]
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(3))

    def logits(model, grad=False):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids).logits.float().detach()

    general = keep_weights_cast(lora_model(tiny_bert)).eval()
    for module in general.modules():  # the path every call took before `LoraPlan`
        module.__dict__.pop("_plan", None)
    kept_apart = logits(apart)
    assert torch.equal(kept_apart, logits(general))
    plans = [m.__dict__.get("_plan") for m in apart.modules() if type(m) is type(layers[0])]
    assert all(p is not None and p.packed is not None for p in plans) == frozen._can_pack()
    calls.clear()
    nbytes = fold_lora_layers(folded)
    if not frozen._can_pack():  # no packed bf16 matmul on this CPU: nothing is folded
        assert nbytes == 0 and torch.equal(logits(folded), kept_apart)
        return
    assert nbytes == 2 * sum(m.base_layer.weight.numel() for m in layers) > 0
    got = logits(folded)
    assert not calls and torch.equal(got, logits(merged))
    assert len(calls) == 0 and torch.equal(logits(folded, grad=True), logits(apart, grad=True))
    assert torch.equal(logits(copy.deepcopy(folded)), logits(apart))  # a copy holds no fold
    calls.clear()
    layers[0].lora_A["default"].weight.requires_grad_(True)  # trained: computed unfolded
    logits(folded)
    assert len(calls) == 1
    layers[0].lora_A["default"].weight.requires_grad_(False)
    with torch.no_grad():
        for name, p in folded.named_parameters():
            if "lora_B" in name:
                p.mul_(-1)
    remerged = keep_weights_cast(copy.deepcopy(folded).merge_and_unload()).eval()
    assert torch.equal(logits(folded), logits(remerged))
    assert not torch.allclose(logits(folded), got, atol=1e-3)
    assert unfold_lora_layers(folded) == len(layers) and unfold_lora_layers(folded) == 0
    assert all(not m.__dict__["_plan"].fold for m in layers)  # kept apart, planned
    assert torch.equal(logits(folded), logits(copy.deepcopy(folded)))  # as the general path
