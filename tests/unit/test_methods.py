"""One matrix over every registered method x every model family it claims (tiny models built in
code, no download):

1. only the intended parameters train, and the trained head is the one the forward uses;
2. the output at init equals the base model where the method promises it;
3. padded and unpadded rows give the same logits;
4. save (trainable_state_dict -> safetensors) -> load on a fresh base gives identical logits;
5. merge gives the same logits as the unmerged model, as a plain savable Transformers model;
6. ~30 AdamW steps at the method's default_lr lower the loss on a learnable toy task;
7. a family the method does not claim is a ConfigError.

Plus method-specific checks (AdaLoRA hooks, prefix attention, adapters). The support table and
its MiniLM figures: test_methods_table.py.
"""
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, LlamaConfig,
                          LlamaForSequenceClassification, MPNetConfig,
                          MPNetForSequenceClassification)

from tunelab.errors import ConfigError
from tunelab.methods import registry
from tunelab.methods.registry import ApplyContext, trainable_state_dict

FAMILIES = ("encoder", "mpnet", "decoder")
HEADS = {"encoder": ["classifier"], "mpnet": ["classifier.dense", "classifier.out_proj"],
         "decoder": ["score"]}
SIGNAL = 5  # toy task: label 1 iff token 5 occurs
STEPS = 30


def build_tiny(family: str):
    # initializer_range 0.2, not 0.02: at 0.02 a 32-wide random model barely mixes tokens, and
    # a head reading position 0 (BERT, MPNet, or a soft prompt put there) learns nothing in 30
    # steps. 0.2 ~ 1/sqrt(32) gives attention that mixes, as in a pretrained model.
    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, num_labels=2, initializer_range=0.2)
    if family == "encoder":
        return BertForSequenceClassification(BertConfig(**small))
    if family == "mpnet":
        return MPNetForSequenceClassification(MPNetConfig(**small))
    return LlamaForSequenceClassification(LlamaConfig(**small, num_key_value_heads=2,
                                                      pad_token_id=0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine threads spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory):
    """Each family's tiny base saved once, so every load starts from the same weights."""
    dirs = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        dirs[family] = tmp_path_factory.mktemp(family)
        build_tiny(family).save_pretrained(dirs[family])
    return dirs


def load_base(base_dirs, family):
    return AutoModelForSequenceClassification.from_pretrained(base_dirs[family]).eval()


def adapt(base_dirs, method, family, seed=0, settings=None, total_steps=STEPS):
    spec = registry.get_method(method)
    torch.manual_seed(seed)
    ctx = ApplyContext("classification", list(HEADS[family]), family, total_steps)
    return registry.apply_method(load_base(base_dirs, family), method,
                                 settings or spec.settings(), ctx)


def make_batch(family, n=32, seed=0):
    """Right-padded rows of length 3..8 over tokens 6..99, half of them containing SIGNAL."""
    g = torch.Generator().manual_seed(seed)
    pad = 1 if family == "mpnet" else 0
    ids = torch.full((n, 8), pad)
    mask = torch.zeros(n, 8, dtype=torch.long)
    labels = torch.arange(n) % 2
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids[i, :length] = torch.randint(6, 100, (length,), generator=g)
        if labels[i]:
            ids[i, int(torch.randint(0, length, (1,), generator=g))] = SIGNAL
        mask[i, :length] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "encoder":
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch, labels


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def perturb(model, seed=1):
    """Stand in for training: move every trainable parameter away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


# Known bugs in code outside this matrix's methods: strict xfail marks, so a fix flags them.
KNOWN_BUGS: dict = {}


def cases(supported=True, known_bugs=False):
    out = []
    for spec in registry.all_methods():
        for family in FAMILIES:
            if (family in spec.families) == supported:
                marks = KNOWN_BUGS.get((spec.name, family), ()) if known_bugs else ()
                out.append(pytest.param(spec.name, family, id=f"{spec.name}-{family}",
                                        marks=marks))
    return out


# --- 1. what trains -----------------------------------------------------------------------


def is_head(name, family):
    """A parameter of the head (PEFT wraps the whole top-level head module; its frozen
    `original_module` copy does not count)."""
    tops = {h.split(".")[0] for h in HEADS[family]}
    return ("original_module" not in name
            and any(re.search(rf"(^|\.){re.escape(t)}\.", name) for t in tops))


EXPECTED_TRAINABLE = {  # name -> does this (non-head) parameter train?
    "full": lambda n: True,
    "freeze": lambda n: False,
    "lora": lambda n: "lora_" in n,
    "adalora": lambda n: re.search(r"\.lora_[ABE]\.", n) is not None,
    "ia3": lambda n: ".ia3_l." in n,
    "bitfit": lambda n: n.endswith(".bias"),
    "adapter_houlsby": lambda n: ".adapter." in n or "norm" in n.lower(),
    "adapter_pfeiffer": lambda n: ".adapter." in n,
    "prefix": lambda n: n.startswith("prefix_encoder."),
    "prompt": lambda n: n.startswith("prompt_encoder."),
    "ptuning": lambda n: n.startswith("prompt_encoder."),
}


@pytest.mark.parametrize("method,family", cases(known_bugs=True))
def test_only_intended_parameters_train(base_dirs, method, family):
    assert method in EXPECTED_TRAINABLE, f"add the expected-trainable rule for {method}"
    model = adapt(base_dirs, method, family)
    for name, p in model.named_parameters():
        expected = is_head(name, family) or EXPECTED_TRAINABLE[method](name)
        assert p.requires_grad == expected, f"{name}: requires_grad={p.requires_grad}"
    assert any(p.requires_grad for n, p in model.named_parameters() if is_head(n, family))


@pytest.mark.parametrize("method,family", cases(known_bugs=True))
def test_trained_head_is_used(base_dirs, method, family):
    model = adapt(base_dirs, method, family)
    batch, _ = make_batch(family, n=4)
    before = logits(model, batch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and is_head(name, family):
                p.add_(1.0)
    assert not torch.allclose(before, logits(model, batch))


# --- 2, 3. output at init, padding ----------------------------------------------------------

CHANGES_OUTPUT_AT_INIT = {"prefix", "prompt", "ptuning"}  # extra tokens: never the identity


@pytest.mark.parametrize("method,family", cases())
def test_output_at_init(base_dirs, method, family):
    batch, _ = make_batch(family, n=4)
    base = logits(load_base(base_dirs, family), batch)
    adapted = logits(adapt(base_dirs, method, family), batch)
    if method in CHANGES_OUTPUT_AT_INIT:
        assert not torch.allclose(base, adapted)
    else:
        torch.testing.assert_close(adapted, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,family", cases())
def test_padding_does_not_change_logits(base_dirs, method, family):
    model = adapt(base_dirs, method, family)
    perturb(model)
    batch, _ = make_batch(family, n=8)
    full = logits(model, batch)
    for row in range(8):
        n = int(batch["attention_mask"][row].sum())
        alone = logits(model, {k: v[row:row + 1, :n] for k, v in batch.items()})
        torch.testing.assert_close(alone[0], full[row], atol=1e-5, rtol=0)


# --- 4, 5. save/load and merge --------------------------------------------------------------


@pytest.mark.parametrize("method,family", cases())
def test_save_load_gives_identical_logits(base_dirs, tmp_path, method, family):
    model = adapt(base_dirs, method, family)
    perturb(model)
    batch, _ = make_batch(family, n=8)
    expected = logits(model, batch)
    save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()},
              tmp_path / "adapter.safetensors")

    saved = load_file(tmp_path / "adapter.safetensors")
    fresh = adapt(base_dirs, method, family, seed=123)  # different random init of new parts
    result = fresh.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
    assert not set(saved) & set(result.missing_keys)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,family", [c for c in cases()
                                           if registry.get_method(c.values[0]).mergeable])
def test_merge_gives_same_logits(base_dirs, tmp_path, method, family):
    spec = registry.get_method(method)
    model = adapt(base_dirs, method, family)
    perturb(model)
    batch, _ = make_batch(family, n=8)
    expected = logits(model, batch)
    merged = spec.merge(model) if spec.merge else model  # no merge function: nothing to fold
    assert type(merged).__name__ == type(load_base(base_dirs, family)).__name__
    assert not [k for k in merged.state_dict() if re.search(
        r"lora_|ia3_|modules_to_save|original_module|base_layer|prefix_encoder|adapter\.", k)]
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-5, rtol=0)


# --- 6. it learns ---------------------------------------------------------------------------


def train(model, spec, batch, labels, steps=STEPS):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.default_lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        if spec.extra_loss is not None:
            loss = loss + spec.extra_loss(model)
        loss.backward()
        optimizer.step()
        if spec.on_step is not None:  # after the step, before the gradients are cleared
            spec.on_step(model, step)
        optimizer.zero_grad(set_to_none=True)


def eval_loss(model, batch, labels):
    return float(torch.nn.functional.cross_entropy(logits(model, batch), labels))


@pytest.mark.parametrize("method,family", cases())
def test_default_lr_lowers_the_loss(base_dirs, method, family):
    spec = registry.get_method(method)
    model = adapt(base_dirs, method, family)
    batch, labels = make_batch(family)
    before = eval_loss(model, batch, labels)
    train(model, spec, batch, labels)
    after = eval_loss(model, batch, labels)
    assert after < before - 0.02, f"loss {before:.4f} -> {after:.4f}"


# --- 7. unsupported families ----------------------------------------------------------------


@pytest.mark.parametrize("method,family", cases(supported=False))
def test_unsupported_family_is_a_config_error(base_dirs, method, family):
    with pytest.raises(ConfigError, match="does not support"):
        adapt(base_dirs, method, family)


# --- method-specific ------------------------------------------------------------------------


def test_adalora_extra_loss_is_peft_regulariser(base_dirs):
    spec = registry.get_method("adalora")
    model = adapt(base_dirs, "adalora", "encoder")
    perturb(model)
    model.eval()  # no dropout: both passes see the same model
    batch, labels = make_batch("encoder", n=4)
    with_reg = model(**batch, labels=labels).loss  # PEFT adds the regulariser here
    plain = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    reg = spec.extra_loss(model)
    assert reg.requires_grad and float(reg.detach()) > 0
    torch.testing.assert_close(plain + reg, with_reg)


def test_adalora_prunes_ranks_and_reloads(base_dirs, tmp_path):
    spec = registry.get_method("adalora")
    model = adapt(base_dirs, "adalora", "encoder")
    batch, labels = make_batch("encoder")
    train(model, spec, batch, labels)
    ranks = [int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n]
    assert min(ranks) < spec.settings().init_r  # the budget was re-allocated
    expected = logits(model, batch)
    fresh = adapt(base_dirs, "adalora", "encoder", seed=5)
    fresh.load_state_dict(trainable_state_dict(model), strict=False)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=1e-6, rtol=0)


def test_adalora_on_step_needs_gradients(base_dirs):
    model = adapt(base_dirs, "adalora", "encoder")
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        registry.get_method("adalora").on_step(model, 1)


def test_prefix_matches_a_key_value_cache_on_llama(base_dirs):
    """On Llama our attention-level prefix equals feeding the same keys/values as a cache."""
    from transformers import DynamicCache

    from tunelab.methods.prefix import PrefixSettings

    settings = PrefixSettings(num_virtual_tokens=3, reparameterize=False)
    model = adapt(base_dirs, "prefix", "decoder", settings=settings)
    with torch.no_grad():
        model.prefix_encoder.prefix.normal_()  # the head stays the base model's
    batch, _ = make_batch("decoder", n=4)
    expected = logits(model, batch)
    base = load_base(base_dirs, "decoder")
    cache = DynamicCache(config=base.config)
    for layer, kv in enumerate(model.prefix_encoder.prefix.detach()):  # (2, P, H * D)
        k, v = (t.view(3, 2, 16).transpose(0, 1).expand(4, -1, -1, -1).contiguous() for t in kv)
        cache.update(k, v, layer)
    mask = torch.cat([torch.ones(4, 3, dtype=torch.long), batch["attention_mask"]], dim=1)
    positions = torch.arange(8).expand(4, -1)  # real tokens start at 0, as in our prefix
    with torch.no_grad():
        got = base(input_ids=batch["input_ids"], attention_mask=mask, cache=cache,
                   position_ids=positions, use_cache=True).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_without_reparameterisation(base_dirs, tmp_path, family):
    from tunelab.methods.prefix import PrefixSettings

    settings = PrefixSettings(reparameterize=False)
    model = adapt(base_dirs, "prefix", family, settings=settings)
    assert {n for n, p in model.named_parameters() if p.requires_grad and not is_head(n, family)} \
        == {"prefix_encoder.prefix"}
    batch, labels = make_batch(family)
    before = eval_loss(model, batch, labels)
    train(model, registry.get_method("prefix"), batch, labels)
    assert eval_loss(model, batch, labels) < before
    fresh = adapt(base_dirs, "prefix", family, seed=9, settings=settings)
    fresh.load_state_dict(trainable_state_dict(model), strict=False)
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,per_layer", [("adapter_houlsby", 2), ("adapter_pfeiffer", 1)])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_placement(base_dirs, method, per_layer, family):
    from tunelab.methods.adapters import AdaptedLinear

    model = adapt(base_dirs, method, family)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    assert len(wrapped) == 2 * per_layer  # 2 layers
    ffn = {"encoder": "output.dense", "mpnet": "output.dense", "decoder": "mlp.down_proj"}
    assert sum(not re.search(r"attention|self_attn", n) and n.endswith(ffn[family])
               for n in wrapped) == 2


@pytest.mark.parametrize("method", [s.name for s in registry.all_methods()
                                    if "decoder" in s.families])
def test_decoder_methods_on_gemma3(method):
    """Gemma-3 (a shipped model) is a decoder with GQA, q/k norms and sliding-window layers."""
    from transformers import Gemma3TextConfig, Gemma3TextForSequenceClassification

    config = Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, pad_token_id=0, num_labels=2, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"])
    spec = registry.get_method(method)
    ctx = ApplyContext("classification", ["score"], "decoder", STEPS)
    models = []
    for seed in (0, 1):
        torch.manual_seed(0)
        base = Gemma3TextForSequenceClassification(config)
        torch.manual_seed(seed)
        models.append(registry.apply_method(base, method, spec.settings(), ctx))
    model, fresh = models
    perturb(model)
    batch, _ = make_batch("decoder", n=4)
    full = logits(model, batch)
    row = int(batch["attention_mask"].sum(1).argmin())  # the most padded row
    n = int(batch["attention_mask"][row].sum())
    alone = logits(model, {k: v[row:row + 1, :n] for k, v in batch.items()})
    torch.testing.assert_close(alone[0], full[row], atol=1e-5, rtol=0)
    fresh.load_state_dict(trainable_state_dict(model), strict=False)
    torch.testing.assert_close(logits(fresh, batch), full, atol=1e-6, rtol=0)


def test_ptuning_lstm_encoder(base_dirs):
    from tunelab.methods.ptuning import PTuningSettings

    model = adapt(base_dirs, "ptuning", "encoder", settings=PTuningSettings(encoder="lstm"))
    assert any("lstm" in n for n, p in model.named_parameters() if p.requires_grad)
    batch, labels = make_batch("encoder")
    before = eval_loss(model, batch, labels)
    train(model, registry.get_method("ptuning"), batch, labels)
    assert eval_loss(model, batch, labels) < before


@pytest.mark.parametrize("method,values", [
    ("adalora", {"target_r": 20}), ("adalora", {"tinit": 0.6, "tfinal": 0.5}),
    ("adalora", {"deltaT": 0}), ("adapter_houlsby", {"reduction_factor": 0}),
    ("adapter_pfeiffer", {"activation": "sigmoid"}), ("ia3", {"target_modules": "(["}),
    ("ia3", {"target_modules": ".*key"}), ("prefix", {"num_virtual_tokens": 0}),
    ("prompt", {"init": "text"}), ("ptuning", {"encoder": "gru"}),
])
def test_bad_settings_are_config_errors(method, values):
    from tunelab.config import build_method_config

    with pytest.raises(ConfigError, match="method\\."):
        build_method_config({"name": method, **values})


def test_settings_fields_are_documented():
    from tunelab.config import describe_fields

    for spec in registry.all_methods():
        for key, _, doc in describe_fields(spec.settings):
            assert doc, f"{spec.name}: method.{key} has no docstring"
