"""Dynamic micro-batching: requests from many clients become few forward passes.

Handlers put a `Job` on a bounded queue and await its future; the event loop never runs
torch. One worker thread takes jobs greedily, groups them by (model, task, with/without text
pairs), runs each group through that model's runner (the Predictor engine) and resolves every
job's future with its own slice of the results. A job is never split: one larger than
`max_batch` runs alone.

Greedy means a request never waits for company it may not get:
  - the worker idle, a job arrives: it runs at once, with whatever else is already queued;
  - jobs that queue while a batch runs form the next batch, which waits for more only until
    `max_wait_ms` after the oldest of them arrived (usually already past: they waited for the
    running batch) or until it holds `max_batch` texts.
So a lone client pays no waiting at all, and under load batches fill from the queue.

A full queue is refused at once (`QueueFull` -> HTTP 503), so overload never turns into a
hang. `pause()` holds the worker back from taking jobs (tests use it to fill the queue
deterministically; it is also how to drain a server for maintenance).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

Runner = Callable[[object, list[str], "list[str] | None"], list]
"""(served model, texts, pairs or None) -> one result per text."""


class QueueFull(Exception):
    pass


@dataclass
class Job:
    model: str
    task: str
    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple:
        return self.model, self.task, self.pairs is not None


class Batcher:
    def __init__(self, models: dict, runners: dict[str, Runner], *, max_batch: int = 64,
                 max_wait_ms: float = 5.0, queue_size: int = 256, threads: int = 1,
                 on_batch: Callable[[str, int], None] | None = None):
        self.models = models
        """Name -> served model (the pool's dict: models added later are seen)."""
        self.runners = runners
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.threads = threads
        self.on_batch = on_batch
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._carry: Job | None = None  # taken from the queue but left for the next batch
        self._idle_since = 0.0  # when the last batch was computed; jobs queued before: busy
        self._gate = threading.Lock()  # held by the worker while it takes jobs, and by pause()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- event-loop side

    async def submit(self, model: str, task: str, texts: list[str],
                     pairs: list[str] | None = None) -> list:
        loop = asyncio.get_running_loop()
        job = Job(model, task, list(texts), list(pairs) if pairs is not None else None,
                  loop.create_future(), loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return await job.future

    def depth(self) -> int:
        """Requests waiting (not yet in a forward pass)."""
        return self._queue.qsize() + (self._carry is not None)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tunelab-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        leftover = [self._carry] if self._carry else []
        self._carry = None
        while True:
            try:
                leftover.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in leftover:
            _resolve(job, error=RuntimeError("the server is shutting down"))

    def pause(self) -> None:
        """Stop taking jobs (the one in progress finishes); returns once the worker is out."""
        self._gate.acquire()

    def resume(self) -> None:
        self._gate.release()

    # ---------------------------------------------------------------- worker side

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        while not self._stop.is_set():
            jobs = self._collect()
            if jobs:
                self._execute(jobs)

    def _collect(self) -> list[Job]:
        if not self._gate.acquire(timeout=0.05):  # paused
            return []
        try:
            return self._take()
        finally:
            self._gate.release()

    def _take(self) -> list[Job]:
        """Up to max_batch texts: a job that found the worker idle goes with what is already
        queued; jobs queued while it was busy wait for more until max_wait after the oldest."""
        jobs, self._carry = ([self._carry] if self._carry else []), None
        if not jobs:
            try:  # short timeout: pause() and stop() wait at most this long
                jobs.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                return []
        size = len(jobs[0].texts)
        # Whether the first job found the worker idle is told by the clock, not by how it was
        # taken: a job put just as a get() timed out would otherwise pass for a waiting one
        queued_while_busy = jobs[0].queued_at < self._idle_since
        deadline = jobs[0].queued_at + (self.max_wait if queued_while_busy else 0.0)
        while size < self.max_batch:
            left = deadline - time.monotonic()
            try:  # past the deadline, still take what is already waiting
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if size + len(job.texts) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            size += len(job.texts)
        return jobs

    def _execute(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.group, []).append(job)
        for (model, task, with_pairs), members in groups.items():
            texts = [t for j in members for t in j.texts]
            pairs = [t for j in members for t in j.pairs] if with_pairs else None
            try:
                results = self.runners[task](self.models[model], texts, pairs)
            except Exception as e:  # the clients get a 500 naming the error; the worker lives
                log.exception("inference failed for model %s", model)
                self._idle_since = time.monotonic()
                for job in members:
                    _resolve(job, error=e)
                continue
            # stamped before answering: a client's next request, sent the moment it has its
            # answer, must not pass for one that queued while this batch ran
            self._idle_since = time.monotonic()
            if self.on_batch is not None:
                self.on_batch(model, len(texts))
            start = 0
            for job in members:
                _resolve(job, results[start:start + len(job.texts)])
                start += len(job.texts)


def _resolve(job: Job, result=None, error: BaseException | None = None) -> None:
    def settle():
        if job.future.done():  # the client went away (cancelled)
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        pass
