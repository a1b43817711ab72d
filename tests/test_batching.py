"""The adaptive batcher (serving/batching.py): requests queued while the model is busy share one
call, results go back to their own requests in order, and one failing call fails only its own."""

import asyncio
import threading

import pytest

from serving.batching import Batcher


def _recording_run(calls):
    def run(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    return run


def test_requests_queued_together_share_one_call_and_get_their_own_results():
    calls = []
    batcher = Batcher(_recording_run(calls), max_batch=64)

    async def main():
        return await asyncio.gather(*(batcher.submit([i, i + 100]) for i in range(5)))

    results = asyncio.run(main())
    assert results == [[i * 10, (i + 100) * 10] for i in range(5)]
    assert calls == [
        [0, 100, 1, 101, 2, 102, 3, 103, 4, 104]
    ]  # all five queued before the worker ran


def test_max_batch_caps_a_call_and_batching_off_runs_one_request_per_call():
    calls = []

    async def main(b):
        return await asyncio.gather(*(b.submit([i]) for i in range(5)))

    assert asyncio.run(main(Batcher(_recording_run(calls), max_batch=2))) == [
        [0],
        [10],
        [20],
        [30],
        [40],
    ]
    assert calls == [[0, 1], [2, 3], [4]]
    calls.clear()
    asyncio.run(main(Batcher(_recording_run(calls), merge=False)))
    assert calls == [[0], [1], [2], [3], [4]]


def test_an_idle_batcher_runs_a_lone_request_at_once_and_later_ones_join_the_next_call():
    calls, gate = [], threading.Event()

    def run(items):
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(5)  # the first call is slow: later requests queue up behind it
        return items

    batcher = Batcher(run)

    async def main():
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.sleep(0.05)  # "a" is running alone
        later = [asyncio.ensure_future(batcher.submit([x])) for x in "bcd"]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*later)

    assert asyncio.run(main()) == (["a"], [["b"], ["c"], ["d"]])
    assert calls == [["a"], ["b", "c", "d"]]


def test_a_failing_call_fails_its_requests_and_the_next_call_still_runs():
    def run(items):
        if "boom" in items:
            raise RuntimeError("model failed")
        return items

    batcher = Batcher(run)

    async def main():
        together = await asyncio.gather(
            batcher.submit(["boom"]), batcher.submit(["x"]), return_exceptions=True
        )
        return together, await batcher.submit(["y"])

    together, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in together) and after == ["y"]


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Batcher(lambda items: items, max_batch=0)
