"""The method matrix beyond sequence classification: every method x every task it claims
(token classification, masked LM, causal LM, instruction tuning) x every model family the task
and the method both support. Tiny models built in code, no download. For each case:

1. only the method's parameters (and the task head, where the task has a new one) train;
2. the output at init equals the base model where the method promises it;
3. save -> load on a fresh base gives identical outputs;
4. merge gives the same outputs as the unmerged model;
5. ~30 AdamW steps at the method's default_lr lower a learnable toy loss;
6. a task the method does not claim is a ConfigError naming the task.

Sequence classification has its own, deeper matrix in test_methods.py.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (BertConfig, BertForMaskedLM, BertForTokenClassification, LlamaConfig,
                          LlamaForCausalLM, LlamaForTokenClassification, MPNetConfig,
                          MPNetForMaskedLM, MPNetForTokenClassification)

from tunelab.errors import ConfigError
from tunelab.methods import registry
from tunelab.methods.registry import ApplyContext, trainable_state_dict

STEPS = 30
VOCAB = 60
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, initializer_range=0.2)

# (task, family) -> (model class, extra config, head modules that are new for the task)
MODELS = {
    ("token_classification", "encoder"): (BertForTokenClassification, BertConfig,
                                          {"num_labels": 3}, ["classifier"]),
    ("token_classification", "mpnet"): (MPNetForTokenClassification, MPNetConfig,
                                        {"num_labels": 3}, ["classifier"]),
    ("token_classification", "decoder"): (LlamaForTokenClassification, LlamaConfig,
                                          {"num_labels": 3, "num_key_value_heads": 2,
                                           "pad_token_id": 0}, ["score"]),
    # continued MLM of a model that ships without an MLM head (MiniLM): the head is new, but
    # its output projection is tied to the input embeddings (tasks.base.untied_head_modules)
    ("mlm", "encoder"): (BertForMaskedLM, BertConfig, {}, ["cls.predictions.transform"]),
    ("mlm", "mpnet"): (MPNetForMaskedLM, MPNetConfig, {}, ["lm_head.dense", "lm_head.layer_norm"]),
    # causal LMs keep their pretrained lm_head: nothing is new
    ("causal_lm", "decoder"): (LlamaForCausalLM, LlamaConfig,
                               {"num_key_value_heads": 2, "pad_token_id": 0}, []),
    ("instruction", "decoder"): (LlamaForCausalLM, LlamaConfig,
                                 {"num_key_value_heads": 2, "pad_token_id": 0}, []),
}
TASKS = sorted({t for t, _ in MODELS})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory):
    dirs = {}
    for (task, family), (cls, config_cls, extra, _) in MODELS.items():
        torch.manual_seed(0)
        dirs[task, family] = tmp_path_factory.mktemp(f"{task}-{family}")
        cls(config_cls(**SMALL, **extra)).save_pretrained(dirs[task, family])
    return dirs


def load_base(base_dirs, task, family):
    return MODELS[task, family][0].from_pretrained(base_dirs[task, family]).eval()


def adapt(base_dirs, method, task, family, seed=0):
    spec = registry.get_method(method)
    torch.manual_seed(seed)
    ctx = ApplyContext(task, list(MODELS[task, family][3]), family, STEPS)
    return registry.apply_method(load_base(base_dirs, task, family), method, spec.settings(), ctx)


def cases(supported=True):
    out = []
    for spec in registry.all_methods():
        for task, family in MODELS:
            claims = task in spec.tasks and family in spec.families
            if claims == supported:
                out.append(pytest.param(spec.name, task, family,
                                        id=f"{spec.name}-{task}-{family}"))
    return out


def make_batch(task, family, n=16, seed=0):
    """Right-padded rows of length 4..10 over tokens 3..VOCAB-1 with learnable targets:
    token classification tags a token by its id mod 3; the LMs see a repeating sequence
    (token t+1 = token t + 1), so the next or masked token is predictable from context."""
    g = torch.Generator().manual_seed(seed)
    pad = 1 if family == "mpnet" else 0
    ids = torch.full((n, 10), pad)
    mask = torch.zeros(n, 10, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(4, 11, (1,), generator=g))
        start = int(torch.randint(3, VOCAB - 12, (1,), generator=g))
        ids[i, :length] = (torch.arange(length) + start if task != "token_classification"
                           else torch.randint(3, VOCAB, (length,), generator=g))
        mask[i, :length] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "encoder":
        batch["token_type_ids"] = torch.zeros_like(ids)
    if task == "token_classification":
        labels = torch.where(mask.bool(), ids % 3, -100)
    elif task == "mlm":
        masked = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
        masked[:, 1] |= mask[:, 1].bool()  # at least one per row
        labels = torch.where(masked, ids, -100)
        batch["input_ids"] = torch.where(masked, 2, ids)  # 2 stands for [MASK]
    else:  # next token, stored shifted as tunelab's LM tasks do
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return batch, labels


def outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def loss_of(logits, labels):
    """Mean cross-entropy over the labelled positions. Prompt-style methods put virtual tokens
    in front: only the last T positions belong to the input."""
    logits = logits[:, -labels.shape[1]:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)


def input_part(logits, batch):
    return logits[:, -batch["input_ids"].shape[1]:][batch["attention_mask"].bool()]


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


# --- 1. what trains -------------------------------------------------------------------------

EXPECTED_TRAINABLE = {
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


def is_head(name, task, family):
    return ("original_module" not in name
            and any(re.search(rf"(^|\.){re.escape(h)}\.", name)
                    for h in MODELS[task, family][3]))


@pytest.mark.parametrize("method,task,family", cases())
def test_only_intended_parameters_train(base_dirs, method, task, family):
    model = adapt(base_dirs, method, task, family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name, p in model.named_parameters():
        expected = is_head(name, task, family) or EXPECTED_TRAINABLE[method](name)
        assert p.requires_grad == expected, f"{name}: requires_grad={p.requires_grad}"


# --- 2. output at init ----------------------------------------------------------------------

CHANGES_OUTPUT_AT_INIT = {"prefix", "prompt", "ptuning"}


@pytest.mark.parametrize("method,task,family", [c for c in cases()
                                                if c.values[0] not in CHANGES_OUTPUT_AT_INIT])
def test_output_at_init_equals_the_base(base_dirs, method, task, family):
    batch, _ = make_batch(task, family, n=4)
    base = outputs(load_base(base_dirs, task, family), batch)
    adapted = outputs(adapt(base_dirs, method, task, family), batch)
    torch.testing.assert_close(adapted, base, atol=1e-6, rtol=0)


# --- 3, 4. save/load, merge -----------------------------------------------------------------


@pytest.mark.parametrize("method,task,family", cases())
def test_save_load_gives_identical_outputs(base_dirs, tmp_path, method, task, family):
    model = adapt(base_dirs, method, task, family)
    perturb(model)
    batch, _ = make_batch(task, family, n=6)
    expected = outputs(model, batch)
    save_file({k: v.contiguous() for k, v in trainable_state_dict(model).items()},
              tmp_path / "adapter.safetensors")
    fresh = adapt(base_dirs, method, task, family, seed=123)
    result = fresh.load_state_dict(load_file(tmp_path / "adapter.safetensors"), strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(outputs(fresh, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,task,family", [c for c in cases()
                                                if registry.get_method(c.values[0]).mergeable])
def test_merge_gives_same_outputs(base_dirs, method, task, family):
    spec = registry.get_method(method)
    model = adapt(base_dirs, method, task, family)
    perturb(model)
    batch, _ = make_batch(task, family, n=6)
    expected = outputs(model, batch)
    merged = spec.merge(model) if spec.merge else model
    assert type(merged) is MODELS[task, family][0]
    assert not [k for k in merged.state_dict() if re.search(
        r"lora_|ia3_|modules_to_save|original_module|base_layer|adapter\.", k)]
    # W + BA summed once rounds apart from W x + B(A x): within fp32 rounding of the outputs
    torch.testing.assert_close(outputs(merged, batch), expected, atol=1e-5, rtol=1e-5)


# --- 5. it learns ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,task,family", cases())
def test_default_lr_lowers_the_loss(base_dirs, method, task, family):
    spec = registry.get_method(method)
    model = adapt(base_dirs, method, task, family)
    batch, labels = make_batch(task, family)
    before = float(loss_of(outputs(model, batch), labels))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=spec.default_lr, weight_decay=0.0)
    for step in range(1, STEPS + 1):
        model.train()
        loss = loss_of(model(**batch).logits, labels)
        if spec.extra_loss is not None:
            loss = loss + spec.extra_loss(model)
        loss.backward()
        optimizer.step()
        if spec.on_step is not None:
            spec.on_step(model, step)
        optimizer.zero_grad(set_to_none=True)
    after = float(loss_of(outputs(model, batch), labels))
    assert after < before - 0.02, f"loss {before:.4f} -> {after:.4f}"


# --- 6. what is not claimed is refused ------------------------------------------------------


@pytest.mark.parametrize("method,task,family", [c for c in cases(supported=False)
                                                if c.values[2] in
                                                registry.get_method(c.values[0]).families])
def test_unclaimed_task_is_a_config_error(base_dirs, method, task, family):
    with pytest.raises(ConfigError, match=f"does not support task {task}"):
        adapt(base_dirs, method, task, family)


def test_docs_task_table_matches_the_registry():
    from pathlib import Path

    from tunelab.methods.table import TASK_COLUMNS

    doc = (Path(__file__).parents[2] / "docs" / "methods.md").read_text(encoding="utf-8")
    for spec in registry.all_methods():
        row = re.search(rf"^\| {spec.name} \|(.*)$", doc, re.M)
        assert row, f"docs/methods.md has no task row for {spec.name}"
        cells = [c.strip() for c in row.group(1).split("|")][:len(TASK_COLUMNS)]
        ticks = tuple(t for t, c in zip(TASK_COLUMNS, cells) if c == "✓")
        assert ticks == tuple(t for t in TASK_COLUMNS if t in spec.tasks), spec.name
