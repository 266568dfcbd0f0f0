"""Shared fixtures: a tiny BERT built in code (no hub) and a small learnable sentiment set."""
import csv
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "lovely", "superb", "fine", "excellent", "wonderful", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "dull", "boring", "horrible", "weak"]
FILLER = ["the", "film", "movie", "plot", "was", "a", "really", "acting", "story", "quite",
          "and", "very", "cast", "ending", "it", "this"]


def toy_rows(n: int, seed: int) -> list[dict]:
    """Sentences whose label is given by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, rng.randrange(3, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive"
                                                                 else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from tunelab.models import build_tiny_model

    texts = [r["text"] for r in toy_rows(200, 0)]
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", kind="bert",
                                texts=texts, vocab_size=120))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """train (20 rows, as in the style guide), validation and test CSVs."""
    d = tmp_path_factory.mktemp("toy")
    return {"train": str(write_csv(d / "train.csv", toy_rows(20, 1))),
            "validation": str(write_csv(d / "validation.csv", toy_rows(16, 2))),
            "test": str(write_csv(d / "test.csv", toy_rows(24, 3)))}


@pytest.fixture
def tiny_overrides(tiny_bert, toy_data, tmp_path):
    """Overrides that train the tiny model on the toy data quickly and deterministically."""
    return [f"model.name={tiny_bert}", f"data.train={toy_data['train']}",
            f"data.validation={toy_data['validation']}", f"data.test={toy_data['test']}",
            "train.lr=1e-3", "train.batch_size=4", "train.epochs=20", "train.log_every=5",
            "train.precision=fp32", "train.threads=1", "train.tracker=none",
            "model.max_length=32", "train.warmup_ratio=0.0", f"run_dir={tmp_path / 'run'}"]


@pytest.fixture(scope="module")
def keep_torch_threads():
    """The serve batcher's worker sets torch's (process-wide) thread count; later tests keep
    theirs. A server-starting module opts in with
    `pytestmark = pytest.mark.usefixtures("keep_torch_threads")`."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def heap_calls(monkeypatch):
    """What a training loop asks of the heap, in order: "keep" (freed memory kept) and
    "release" (given back), recorded instead of done."""
    from tunelab.train import memory

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(memory, "release_heap", lambda: calls.append("release"))
    return calls


def count_outputs(monkeypatch, plan_class) -> list[bool]:
    """Patch `plan_class.output` to record, for each call, whether the plan computed the
    output (True) or handed back to the general path (None -> False)."""
    calls = []
    output = plan_class.output

    def counted(self, *args):
        out = output(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(plan_class, "output", counted)
    return calls


def padded_inputs(padded: bool = True) -> dict:
    """Three rows of 11 token ids for a tiny encoder (ids 5-99), the second and third padded
    after 7 and 4 tokens where `padded`."""
    import torch

    ids = torch.randint(5, 100, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}
