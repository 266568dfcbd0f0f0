"""The server's torch work off long-lived threads (`serve.threads`): start-up loading, adding a
run and explaining on threads that end with the call; the generation lane's thread going when
the lane falls idle."""
import asyncio
import threading

import pytest

from tunelab.serve import app as serve_app
from tunelab.serve.generation import GenerationLane
from tunelab.serve.threads import awaited_in_own_thread, in_own_thread


def test_in_own_thread_runs_on_a_thread_that_ends():
    seen = []
    assert in_own_thread(lambda a, b: seen.append(threading.current_thread()) or a + b, 2, 3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="missing"):
        in_own_thread(lambda: {}["missing"])


def test_awaited_in_own_thread_gives_the_result_or_the_error():
    seen = []

    def work(x):
        seen.append(threading.current_thread())
        if x < 0:
            raise ValueError("negative")
        return x * 2

    async def main():
        assert await awaited_in_own_thread(work, 21) == 42
        with pytest.raises(ValueError, match="negative"):
            await awaited_in_own_thread(work, -1)
        gate = threading.Event()
        waiting = asyncio.ensure_future(awaited_in_own_thread(gate.wait))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the caller stops waiting; the thread finishes its call
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()

    asyncio.run(main())
    assert len(seen) == 2 and all(t is not threading.main_thread() for t in seen)
    for t in seen:
        t.join(5)
        assert not t.is_alive()


def test_serve_loads_its_runs_off_the_main_thread(monkeypatch, tmp_path):
    loaded = []

    class Pool:
        def __init__(self, *args):
            self.models = {}

        def add(self, name, folder, settle=True):
            loaded.append((threading.current_thread(), settle))
            raise SystemExit("stop here")  # before the app and uvicorn

    monkeypatch.setattr(serve_app, "ModelPool", Pool)
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="stop here"):
        serve_app.serve([str(tmp_path / "run")], serve_app.ServeSettings())
    assert loaded and loaded[0][0] is not threading.main_thread() and loaded[0][1] is False


def test_the_generation_lane_lets_its_thread_go_when_idle():
    others = set(threading.enumerate())  # another test's lane may still be closing

    def lane_threads():
        return [t for t in threading.enumerate()
                if t.name.startswith("tunelab-generate") and t not in others]

    async def main():
        lane = GenerationLane(4)
        try:
            results = await asyncio.gather(*(lane.submit(lambda i=i: (i, lane_threads()))
                                             for i in range(3)))
            assert [i for i, _ in results] == [0, 1, 2]
            assert all(len(threads) == 1 for _, threads in results)  # one at a time
            for _ in range(100):
                await asyncio.sleep(0.01)
                if not lane_threads():
                    break
            assert not lane_threads() and lane.held == 0
            assert await lane.submit(lambda: 7) == 7  # the next request starts another
        finally:
            lane.close()

    asyncio.run(main())
