"""Dynamic batching: posts from concurrent callers share one forward pass.

Callers `submit` a post and await its future. One coroutine gathers up to `max_batch_size`
posts or waits `max_wait_s` after the first, whichever comes first, drops posts whose
caller has gone (cancelled future) or whose deadline has passed, and runs the batch on a
single worker thread that owns the device, so the event loop never blocks on the model.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app.model.post import Post
from app.service.engine import Decision
from app.service.errors import DeadlineExceededError, QueueFullError
from app.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[Post]], list[Decision]]


@dataclass
class _Pending:
    post: Post
    deadline: float  # time.monotonic()
    future: asyncio.Future[Decision]
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """A bounded queue in front of one model thread."""

    def __init__(
        self,
        run_batch: RunBatch,
        metrics: ServiceMetrics,
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        retry_after_s: int = 1,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1, max_wait_s >= 0")
        self._run_batch = run_batch
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radar-model")
        self._task: asyncio.Task[None] | None = None
        metrics.track_queue(self._queue.qsize)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The model thread: anything touching the model runs here."""
        return self._executor

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="radar-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def submit(self, post: Post, deadline: float) -> asyncio.Future[Decision]:
        """Queue one post; raises `QueueFullError` at once when the queue is full."""
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(post, deadline, future))
        except asyncio.QueueFull:
            self._metrics.rejected.labels("queue_full").inc()
            raise QueueFullError("the router's queue is full", self.retry_after_s) from None
        return future

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            try:
                await self._process(batch)
            except Exception:  # the loop must outlive any one batch
                log.exception("batch of %d posts failed outside the model", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("internal batching error"))

    async def _gather(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        close_at = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _process(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # the caller disconnected or gave up
                continue
            if now >= item.deadline:
                self._metrics.rejected.labels("deadline").inc()
                item.future.set_exception(DeadlineExceededError("deadline passed in the queue"))
                continue
            self._metrics.queue_wait.observe(now - item.enqueued)
            live.append(item)
        if not live:
            return
        self._metrics.batch_size.observe(len(live))
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        decisions = await loop.run_in_executor(
            self._executor, self._run_batch, [item.post for item in live]
        )
        self._metrics.forward_time.observe(time.monotonic() - started)
        if len(decisions) != len(live):
            raise RuntimeError(f"{len(decisions)} decisions for {len(live)} posts")
        for item, decision in zip(live, decisions, strict=True):
            if not item.future.done():
                item.future.set_result(decision)
