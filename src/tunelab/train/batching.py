"""Batch order: length-grouped, shuffled, seeded by (seed, epoch) so any position can be
recomputed on resume, and sharded across processes without a distributed sampler."""
from __future__ import annotations

import math
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


def eval_batches(lengths: list[int], batch_size: int,
                 split_cost: int | None = None) -> list[list[int]]:
    """Longest first: padding only to similar lengths, and an out-of-memory shows at once.
    `split_cost`: a forward pass's own cost in padded tokens; each batch is then cut where its
    padding costs more than another pass (`split_by_padding`)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if split_cost is None:
        return batches
    return [part for batch in batches
            for part in split_by_padding(batch, [lengths[i] for i in batch], split_cost)]


SPLIT_COST_TOKENS = 64
"""What one more forward pass costs on CPU, in padded tokens: MiniLM in bf16 took ~4 ms for a
short sentence and ~55 us for each further token (two cores)."""


def split_by_padding(batch: list[int], lengths: list[int], split_cost: int) -> list[list[int]]:
    """`batch` (longest first) cut into runs that minimise the padded tokens computed plus
    `split_cost` for each pass (the runs pad to their first, longest, item). A batch of
    mixed lengths, as the server's micro-batches are, pads its short texts to the longest: 64
    SST-2 sentences drawn at random predicted at 213-224 sentences/s in one pass and at 346-406
    cut in passes of 8 to 32 (MiniLM, bf16); a length-sorted file keeps its passes whole."""
    n = len(batch)
    best = [0] + [math.inf] * n  # best[j]: the cheapest cost of the first j items
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # the last run is items i..j-1
            run = split_cost + (j - i) * lengths[i]
            if run >= best[j]:
                break  # longer runs start with longer items: none costs less
            if best[i] + run < best[j]:
                best[j], cut[j] = best[i] + run, i
    parts, j = [], n
    while j > 0:
        parts.append(batch[cut[j]:j])
        j = cut[j]
    return parts[::-1]


def lockstep_batches(batches: list, rank: int, world: int) -> tuple[list, int]:
    """This process's share of evaluation batches, padded with repeats of its last (or the
    first) batch so every process runs the same number of forward passes -> (share, real)
    where only the first `real` batches count."""
    share = batches[rank::world]
    need = -(-len(batches) // world)
    filler = share[-1] if share else batches[0]
    return share + [filler] * (need - len(share)), len(share)
