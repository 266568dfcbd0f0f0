"""The training loop's memory helpers: when the heap is trimmed, freed memory kept for the
next step, and the kept embedding gradients (same gradients as torch's dense backward, in a
tensor that stays)."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from tunelab.train import embedding_grads, memory
from tunelab.train.embedding_grads import EmbeddingGrads


def test_the_heap_is_trimmed_only_when_resident_memory_grows(monkeypatch):
    readings = iter([1000, 1040, 1060, 700, 1000, 1049, 1051, None])
    monkeypatch.setattr(memory, "resident_bytes", lambda: next(readings))
    trims = []
    monkeypatch.setattr(memory, "malloc_trim", lambda: trims.append(1) or True)
    trimmer = memory.HeapTrimmer(slack=0.05)
    # 1000 is the working set; 1040 within 5%; 1060 over: trim, and the set is measured again
    # at the next reading (700); 1000 > 735: trim; 1049 is the new working set, 1051 within;
    # no reading (no /proc): nothing
    assert [trimmer() for _ in range(8)] == [False, False, True, False, True, False, False,
                                             False]
    assert len(trims) == trimmer.trims == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resident_bytes_follows_what_the_process_touches():
    before = memory.resident_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, written
    after = memory.resident_bytes()
    assert before > 0 and after - before > 48 * 2**20
    del block
    assert memory.malloc_trim() is True  # glibc


KEPT_SCRIPT = """
import resource, torch
from tunelab.train import memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MB written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
returned = faults()
assert memory.keep_freed_memory() and memory.keep_freed_memory()  # a second call: the same
faults()  # the first block after the switch is faulted in once
print(returned, faults())
"""


@pytest.mark.skipif(not memory.glibc(), reason="glibc's malloc only")
def test_freed_memory_kept_is_not_faulted_in_again():
    """glibc unmaps a freed 64 MB block and faults the next one in page by page; once freed
    memory is kept, the same block is reused (a separate process: the switch is for good)."""
    out = subprocess.run([sys.executable, "-c", KEPT_SCRIPT], capture_output=True, text=True,
                         check=True).stdout
    returned, kept = map(int, out.split())
    assert returned > 20 * 10_000  # ~16,000 4 KiB pages per block
    assert kept < returned / 50


RELEASE_SCRIPT = """
import torch
from tunelab.train import memory

assert memory.keep_freed_memory()
block = torch.ones(256 * 2**20 // 4)  # 256 MB, written
del block
kept = memory.resident_bytes()
assert memory.release_heap()
print(kept, memory.resident_bytes())
"""


@pytest.mark.skipif(not memory.glibc(), reason="glibc's malloc only")
def test_a_finished_run_gives_kept_memory_back():
    out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True,
                         text=True, check=True).stdout
    kept, released = map(int, out.split())
    assert kept - released > 200 * 2**20  # the freed 256 MB stayed resident until the release


def test_training_releases_the_heap_when_it_ends(tiny_overrides, monkeypatch):
    from tunelab.cli import main
    from tunelab.train import loop

    released = []
    monkeypatch.setattr(loop, "release_heap", lambda: released.append(1))
    assert main(["train", *tiny_overrides, "train.epochs=1"]) == 0
    assert released == [1]


class Tied(nn.Module):
    """A masked-LM shape: the output layer shares the word embedding's weight."""

    def __init__(self, rows=64, dim=8):
        super().__init__()
        self.words = nn.Embedding(rows, dim, padding_idx=0)
        self.positions = nn.Embedding(16, dim)
        self.out = nn.Linear(dim, rows, bias=False)
        self.out.weight = self.words.weight

    def forward(self, ids):
        h = self.words(ids) + self.positions(torch.arange(ids.shape[1]))
        return self.out(torch.tanh(h))


def grads_after(model, batches, kept):
    """Gradients of each step, and the word-embedding gradient tensor's address per step."""
    grads, addresses = [], []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for ids in batches:
        if kept is not None:
            kept.attach()
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        addresses.append(model.words.weight.grad.data_ptr())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads, addresses


def test_kept_gradients_equal_torchs_dense_ones_tied_weights_too(monkeypatch):
    monkeypatch.setattr(embedding_grads, "MIN_ROWS", 32)
    torch.manual_seed(0)
    batches = [torch.randint(0, 64, (4, 12)) for _ in range(3)]
    reference = Tied()
    model = Tied()
    model.load_state_dict(reference.state_dict())
    kept = EmbeddingGrads(model)
    assert len(kept) == 1  # the 64-row table (and the output layer sharing it); not positions
    assert model.words.sparse and not model.positions.sparse
    expected, _ = grads_after(reference, batches, None)
    got, addresses = grads_after(model, batches, kept)
    for step_expected, step_got in zip(expected, got):
        for name, grad in step_expected.items():
            assert not step_got[name].is_sparse
            torch.testing.assert_close(step_got[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert len(set(addresses)) == 1  # one tensor, kept across steps


def test_frozen_and_small_tables_keep_torchs_gradients():
    model = nn.Sequential(nn.Embedding(embedding_grads.MIN_ROWS, 4), nn.Embedding(8, 4),
                          nn.Embedding(embedding_grads.MIN_ROWS, 4, max_norm=1.0))
    model[0].weight.requires_grad_(False)
    assert len(EmbeddingGrads(model)) == 0
    assert not any(m.sparse for m in model)
