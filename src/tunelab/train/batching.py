"""Batch order: length-grouped, shuffled, seeded by (seed, epoch) so any position can be
recomputed on resume, and sharded across processes without a distributed sampler."""
from __future__ import annotations

import random


def train_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, megabatch: int = 50) -> list[list[int]]:
    """Shuffle, then (optionally) sort by length inside megabatches of `megabatch` batches so
    each batch pads to a similar length; finally shuffle the batches themselves."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        size = batch_size * megabatch
        order = [i for start in range(0, len(order), size)
                 for i in sorted(order[start:start + size], key=lambda j: -lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def shard(batches: list, rank: int, world: int) -> list:
    """This process's share; every process gets the same number of batches."""
    if world == 1:
        return batches
    if len(batches) < world:
        raise ValueError(f"{len(batches)} batches cannot be shared by {world} processes")
    usable = len(batches) - len(batches) % world
    return batches[:usable][rank::world]


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Longest first: padding only to similar lengths, and an out-of-memory shows at once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def lockstep_batches(batches: list, rank: int, world: int) -> tuple[list, int]:
    """This process's share of evaluation batches, padded with repeats of its last (or the
    first) batch so every process runs the same number of forward passes -> (share, real)
    where only the first `real` batches count."""
    share = batches[rank::world]
    need = -(-len(batches) // world)
    filler = share[-1] if share else batches[0]
    return share + [filler] * (need - len(share)), len(share)
