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


def padded_cost(parts, ls, split_cost):
    return sum(split_cost + len(p) * max(ls[i] for i in p) for p in parts)


def test_mixed_batches_are_cut_where_padding_costs_more_than_a_pass():
    import itertools

    from tunelab.train.batching import split_by_padding

    rng = random.Random(3)
    for _ in range(30):
        ls = [rng.randrange(3, 80) for _ in range(9)]
        batch = sorted(range(9), key=lambda i: -ls[i])
        parts = split_by_padding(batch, [ls[i] for i in batch], 20)
        assert [i for p in parts for i in p] == batch  # every item once, in order
        # the cheapest of every way to cut the batch into runs
        best = min(padded_cost([batch[a:b] for a, b in zip((0, *cuts), (*cuts, 9))], ls, 20)
                   for k in range(9) for cuts in itertools.combinations(range(1, 9), k))
        assert padded_cost(parts, ls, 20) == best


def test_eval_batches_split_mixed_lengths_and_keep_even_ones_whole():
    ls = lengths(64, seed=4)
    assert [len(b) for b in eval_batches(ls, 64)] == [64]
    cut = eval_batches(ls, 64, split_cost=64)
    assert len(cut) > 1 and sorted(i for b in cut for i in b) == list(range(64))
    assert padded_cost(cut, ls, 64) < padded_cost(eval_batches(ls, 64), ls, 64)
    even = [40] * 60 + [39] * 68  # a length-sorted file: passes stay whole
    assert [len(b) for b in eval_batches(even, 64, split_cost=64)] == [64, 64]
