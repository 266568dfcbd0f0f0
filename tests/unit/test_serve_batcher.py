"""The micro-batcher's greedy drain, with a runner that needs no model: a lone request never
waits for company; requests that queue while a batch runs form the next batch, which waits
for more (up to max_wait) and runs as soon as it is full."""
import asyncio
import threading
import time

from tunelab.serve.batcher import Batcher


class Recorder:
    """Upper-cases texts; records every batch; holds the first batch until `release` is set."""

    def __init__(self, hold_first: bool = False):
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, served, texts, pairs):
        self.batches.append(list(texts))
        self.release.wait(10)
        return [t.upper() for t in texts]


def started(runner: Recorder, **settings) -> tuple[Batcher, list[int]]:
    sizes: list[int] = []
    batcher = Batcher({"m": object()}, {"echo": runner}, threads=1,
                      on_batch=lambda model, n: sizes.append(n), **settings)
    batcher.start()
    return batcher, sizes


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_a_lone_request_does_not_wait_for_company():
    batcher, sizes = started(Recorder(), max_wait_ms=500)

    async def one(texts):
        start = time.perf_counter()
        out = await batcher.submit("m", "echo", texts)
        return out, time.perf_counter() - start

    try:
        asyncio.run(one(["warm-up"]))  # the worker's first job waits for it to import torch
        for texts in (["a"], ["b", "c"], ["d"]):
            out, took = asyncio.run(one(texts))
            assert out == [t.upper() for t in texts]
            assert took < 0.25, f"a lone request took {took:.3f} s (max_wait is 0.5 s)"
    finally:
        batcher.stop()
    assert sizes == [1, 1, 2, 1]


def test_requests_queued_during_a_batch_form_the_next_one():
    runner = Recorder(hold_first=True)
    batcher, sizes = started(runner, max_batch=4, max_wait_ms=5000)

    async def scenario():
        first = asyncio.create_task(batcher.submit("m", "echo", ["a"]))
        await until(lambda: runner.batches)  # "a" runs at once, alone, and is held there
        queued = [asyncio.create_task(batcher.submit("m", "echo", [t])) for t in "bcd"]
        await until(lambda: batcher.depth() == 3)
        runner.release.set()
        await asyncio.sleep(0.2)
        # b, c, d queued while a batch ran: they wait for company (max_wait 5 s) ...
        assert runner.batches == [["a"]] and not any(t.done() for t in queued)
        last = asyncio.create_task(batcher.submit("m", "echo", ["e"]))
        # ... and run the moment the batch is full (max_batch 4), long before max_wait
        results = await asyncio.wait_for(asyncio.gather(first, *queued, last), 3)
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        batcher.stop()
    assert results == [["A"], ["B"], ["C"], ["D"], ["E"]]
    assert runner.batches == [["a"], ["b", "c", "d", "e"]]
    assert sizes == [1, 4]
