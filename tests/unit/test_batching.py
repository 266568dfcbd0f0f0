import random

import pytest

from tunelab.train.batching import eval_batches, shard, train_batches


def lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(5, 120) for _ in range(n)]


def test_every_example_once_and_deterministic():
    ls = lengths()
    a = train_batches(ls, 32, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(len(ls)))
    assert a == train_batches(ls, 32, seed=1, epoch=0)
    assert a != train_batches(ls, 32, seed=1, epoch=1)
    assert a != train_batches(ls, 32, seed=2, epoch=0)


def padded_tokens(ls, batches):
    return sum(max(ls[i] for i in b) * len(b) for b in batches)


def test_length_grouping_cuts_padding():
    ls = lengths()
    grouped = padded_tokens(ls, train_batches(ls, 32, 0, 0, group_by_length=True))
    plain = padded_tokens(ls, train_batches(ls, 32, 0, 0, group_by_length=False))
    assert grouped < 0.7 * plain
    assert grouped >= sum(ls)


def test_shard_gives_equal_disjoint_shares():
    batches = [[i] for i in range(7)]
    a, b = shard(batches, 0, 2), shard(batches, 1, 2)
    assert len(a) == len(b) == 3 and not set(map(tuple, a)) & set(map(tuple, b))
    assert shard(batches, 0, 1) == batches
    with pytest.raises(ValueError):
        shard([[0]], 0, 2)


def test_eval_batches_cover_all_longest_first():
    ls = lengths(100)
    batches = eval_batches(ls, 16)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert ls[batches[0][0]] == max(ls)
