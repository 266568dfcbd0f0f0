"""The support matrix of the adaptation methods: `tunelab methods` and docs/methods.md.

Families, tasks, merge support, what is saved and the default learning rate come from each
method's registration; the trainable share is measured live on a tiny BERT built in code (so it
can never drift from the code); the MiniLM share was measured with the slow test
tests/unit/test_methods.py::test_minilm_forward_backward, which checks these figures.
"""
from __future__ import annotations

import warnings

from tunelab.methods import registry

FAMILIES = ("encoder", "mpnet", "decoder")
TASK_COLUMNS = {"classification": "seq-cls", "token_classification": "tok-cls", "mlm": "mlm",
                "causal_lm": "clm", "instruction": "instruct"}

# Methods whose trained weights are separate modules on an unchanged, shared base model, so a
# server can keep one base and switch (or route between) many of them. BitFit changes the base
# model's own biases, freeze (with train_layers) and full its own weights: each of those is
# served as a model of its own.
HOT_SWAPPABLE = {"lora", "adalora", "ia3", "adapter_houlsby", "adapter_pfeiffer", "prefix",
                 "prompt", "ptuning"}

# Trainable share (%) on all-MiniLM-L6-v2 (22.7M parameters) with a 2-label head and default
# settings; the lead will add accuracy and timing figures from real runs.
MINILM_TRAINABLE = {
    "adalora": 2.196, "adapter_houlsby": 1.043, "adapter_pfeiffer": 0.501, "bitfit": 0.118,
    "freeze": 0.0034, "full": 100.0, "ia3": 0.064, "lora": 1.464, "prefix": 2.864,
    "prompt": 0.037, "ptuning": 1.990,
}


def tiny_bert_context():
    """A 2-layer, 32-wide BERT classifier built in code (no download) and its context."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=2)
    model = BertForSequenceClassification(config)
    return model, registry.ApplyContext("classification", ["classifier"], "encoder", 100)


def trainable_share(spec: registry.MethodSpec) -> float:
    """Trainable parameters after `apply`, in % of the base model's parameters."""
    model, ctx = tiny_bert_context()
    _, base_total = registry.count_parameters(model)
    with warnings.catch_warnings():  # library deprecation chatter, not the user's concern
        warnings.simplefilter("ignore")
        model = spec.apply(model, spec.settings(), ctx)
    trainable, _ = registry.count_parameters(model)
    return 100.0 * trainable / base_total


def support_rows() -> list[dict]:
    rows = []
    for spec in registry.all_methods():
        rows.append({
            "name": spec.name,
            "summary": spec.summary,
            "paper": spec.paper,
            "families": list(spec.families),
            "tasks": list(spec.tasks),
            "mergeable": spec.mergeable,
            "saves": spec.saves,
            "hot_swap": spec.name in HOT_SWAPPABLE,
            "default_lr": spec.default_lr,
            "hooks": [h for h in ("on_step", "extra_loss") if getattr(spec, h) is not None],
            "trainable_pct_tiny_bert": round(trainable_share(spec), 2),
            "trainable_pct_minilm": MINILM_TRAINABLE.get(spec.name),
        })
    return rows


def _mark(ok: bool) -> str:
    return "yes" if ok else "-"


def format_lr(lr: float) -> str:
    """5e-05 -> '5e-5', 0.001 -> '1e-3', 0.00025 -> '2.5e-4'."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _pct(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.3g}%" if value < 100 else "100%"


def format_methods_table(rows: list[dict] | None = None) -> str:
    """Plain-text table for the CLI."""
    rows = support_rows() if rows is None else rows
    header = ["method", *FAMILIES, *TASK_COLUMNS.values(), "merge", "saves", "hot-swap", "lr",
              "% MiniLM", "% tiny", "what trains"]
    body = [[r["name"], *(_mark(f in r["families"]) for f in FAMILIES),
             *(_mark(t in r["tasks"]) for t in TASK_COLUMNS), _mark(r["mergeable"]),
             r["saves"], _mark(r["hot_swap"]), format_lr(r["default_lr"]),
             _pct(r["trainable_pct_minilm"]), _pct(r["trainable_pct_tiny_bert"]), r["summary"]]
            for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = ("encoder = BERT-like, mpnet = MPNet, decoder = Llama-like. seq-cls = sequence "
             "classification, tok-cls = token classification (NER), mlm = masked LM, clm = "
             "causal LM, instruct = instruction tuning; a task needs a model family that has it "
             "(mlm: encoder/mpnet; clm, instruct: decoder). hot-swap: the trained "
             "weights are separate modules on a shared base model. % = trainable parameters / "
             "base model parameters (MiniLM: 2 labels, default settings).")
    return "\n".join(lines) + "\n\n" + notes
