"""Micro-batching: concurrent calls share one engine run.

When the engine is idle a call is handed to it at once, in the same event-loop turn (a lone call
never waits for a worker to wake up). While a run is in progress, calls queue up; when it finishes,
everything queued (up to `max_batch`) goes into the next run. `max_wait_s` > 0 lets an idle engine
wait that long for a batch to fill. Calls whose caller gave up (deadline, cancellation) are
dropped before their run, so they cost nothing; `run_batch` is also told which callers are still
waiting, so that one gone during the run books nothing it decided.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[T], Callable[[int], bool]], Sequence[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        executor: ThreadPoolExecutor,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._executor = executor
        self._queue: collections.deque[tuple[T, asyncio.Future[R]]] = collections.deque()
        self._running = False
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queues `item`; the future resolves to its result. Cancelling it withdraws the item.

        A plain future, not a coroutine: awaiting it with a timeout then needs no task of its own.
        The queue is unbounded: admission is limited upstream."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        if self._stopped:
            fut.cancel()
            return fut
        self._queue.append((item, fut))
        if not self._running:
            if self._max_wait_s <= 0 or len(self._queue) >= self._max_batch:
                self._dispatch(loop)
            elif self._timer is None:
                self._timer = loop.call_later(self._max_wait_s, self._dispatch, loop)
        return fut

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch: list[tuple[T, asyncio.Future[R]]] = []
        while self._queue and len(batch) < self._max_batch:
            item, fut = self._queue.popleft()
            if not fut.done():
                batch.append((item, fut))
        if not batch:
            self._running = False
            return
        self._running = True

        def waiting(i: int) -> bool:
            # read from the engine thread: a single attribute read of the future's state
            return not batch[i][1].done()

        running = self._executor.submit(self._run_batch, [item for item, _ in batch], waiting)
        running.add_done_callback(lambda done: loop.call_soon_threadsafe(self._finish, loop, batch, done))

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[T, asyncio.Future[R]]],
        done: ThreadFuture[Sequence[R]],
    ) -> None:
        error = done.exception()
        results: Sequence[R | BaseException] = [error] * len(batch) if error else done.result()
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        self._running = False
        if self._queue and not self._stopped:
            self._dispatch(loop)

    def stop(self) -> None:
        """Withdraws every queued call; a run in progress still completes."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.cancel()
