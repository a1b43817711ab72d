"""Adaptive batching across concurrent requests, without a timer.

One worker thread runs the model. A request that finds it idle runs at once (batch of one: no
added latency at low load); requests that arrive while a batch runs queue up, and the next batch
takes all of them (up to `max_batch` scenarios). Batches grow with the load and shrink back when
it falls, with nothing to tune. Each request was validated before it joined the queue, so one bad
request never fails the others in its batch.

Why not BentoML's `batchable=True` API: it batches one list-typed argument, so the "one scenario
or a list" request and the per-request 400s would be lost (a bad scenario would fail everyone in
its batch), and its dispatcher polls on a 1 ms tick.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Batcher:
    """`await batcher.submit(items)` -> `run`'s results for those items, computed in one worker
    thread together with whatever other requests were waiting (`merge=False`: one request per
    call). `run(items) -> results` (same length and order) runs in that one thread only."""

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        max_batch: int = 256,
        merge: bool = True,
        observe: Callable[[int], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run, self.max_batch, self.merge, self.observe = run, max_batch, merge, observe
        self._queue: collections.deque[tuple[list[Any], asyncio.Future]] = collections.deque()
        self._busy = False
        self._task: asyncio.Task | None = None  # a reference keeps the running drain task alive
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twin-ml-model")

    async def submit(self, items: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((items, future))
        if not self._busy:
            self._busy = True
            self._task = loop.create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[Any], asyncio.Future]]:
        jobs, n = [], 0
        while self._queue and (not jobs or n + len(self._queue[0][0]) <= self.max_batch):
            items, future = self._queue.popleft()
            if future.cancelled():  # the client went away while queued
                continue
            jobs.append((items, future))
            n += len(items)
            if not self.merge:  # batching off: one request per model call, still one at a time
                break
        return jobs

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                jobs = self._take()
                if not jobs:
                    continue
                items = [x for job_items, _ in jobs for x in job_items]
                try:
                    if self.observe is not None:
                        self.observe(len(items))
                    results = await loop.run_in_executor(self._executor, self.run, items)
                    if len(results) != len(items):
                        raise RuntimeError(
                            f"the model call returned {len(results)} results for {len(items)} items"
                        )
                except (
                    BaseException
                ) as e:  # handed to every waiting request (cancellation: then re-raised)
                    for _, future in jobs:
                        if not future.done():
                            future.set_exception(
                                e if isinstance(e, Exception) else RuntimeError("batcher stopped")
                            )
                    if not isinstance(e, Exception):
                        raise
                    continue
                k = 0
                for job_items, future in jobs:
                    if not future.done():
                        future.set_result(list(results[k : k + len(job_items)]))
                    k += len(job_items)
        finally:
            self._busy = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
