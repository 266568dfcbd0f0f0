"""Torch work in the server runs on threads that end with it, but for the batcher's worker.

torch's CPU kernels run their parallel regions with OpenMP, and GNU OpenMP keeps a pool of
helper threads for each thread that has run one, for that thread's whole life. Once the pools
hold more threads than there are cores, OpenMP stops letting idle helpers spin and puts them
to sleep, and every parallel region then waits for them to wake. On 2 cores a layer norm of
64 x 384 took 65 us instead of 10, and one short sentence through a MiniLM LoRA run 12.7 ms
instead of 6.3, once a second thread had run torch (the first: the main thread, loading the
models). So the batcher's worker is the one thread that keeps running torch; loading at start,
adding a run and explaining run on a thread of their own that ends when they are done (its
pool goes with it), and the generation lane lets its thread go when it falls idle.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future


def _start(fn, args) -> tuple[Future, threading.Thread]:
    """fn(*args) on a new thread that ends when it returns; its future and the thread."""
    future: Future = Future()

    def run():
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to the caller, raised there
                future.set_exception(e)

    thread = threading.Thread(target=run, name="tunelab-torch-once", daemon=True)
    thread.start()
    return future, thread


def in_own_thread(fn, *args):
    """fn(*args) on a new thread that ends when it returns; its result, or its exception."""
    future, thread = _start(fn, args)
    thread.join()
    return future.result()


async def awaited_in_own_thread(fn, *args):
    """`in_own_thread` for the event loop: awaits fn(*args) on a new thread that ends with it.
    A cancelled caller stops waiting; the thread still finishes its call."""
    return await asyncio.wrap_future(_start(fn, args)[0])
