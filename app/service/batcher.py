"""Dynamic batching: posts from concurrent callers share one forward pass.

Callers `submit` a post and await its future. One coroutine gathers up to `max_batch_size`
posts or waits `max_wait_s` after the first, whichever comes first (no wait at all for a
lone post at low load, see `SOLO_BATCHES`), drops posts whose
caller has gone (cancelled future) or whose deadline has passed, and runs the batch on a
single worker thread that owns the device, so the event loop never blocks on the model.

The admission policy (`app/service/admission_policy.py`) refuses a request at the door,
before any of its work, when its posts would likely miss their deadline; the batcher gives it
the counts of posts ahead and the cycle time per post of each batch it runs.

A post whose caller stopped waiting (504, hang-up) while it was in the forward still gets its
decision computed; `submit`'s `unclaimed` callback receives it (the decision log keeps it,
flagged) instead of it being thrown away.

Preparing the next batch while the model runs (issue 15, item 2). Building a batch's inputs
(tokenising, image resize and patchify: `prepare`, `RouterEngine.prepare` in the service) is
CPU work that used to run on the model thread before each forward, so the device idled while
the CPU prepared and the CPU waited while the device ran: a cycle of prepare + forward. Now a
two-stage pipeline: while batch n runs on the model thread, batch n + 1 is gathered and
prepared on a preparing thread, and handed to the model the moment it is free, so at
saturation a batch leaves every max(prepare, forward). One batch is prepared ahead, no more:
its posts are out of the queue, so deeper would only take posts from later batches early and
answer them no sooner. A batch short of full stays open until the model is free plus the wait
(`_close_at`), so the callers the model answers can join it (closed earlier, 32 callers
settled into two half batches for good); once it has gone quiet for the wait while the model
is busy, it is prepared ahead as it stands (`_prepare_ahead`), and those inputs are used if
nobody joins it before it closes. With 32 closed-loop callers in two cohorts of 16, each
cohort is back long before the other's forward ends, so its preparing overlaps that forward
(before, it began when the model was free: a cycle of prepare + forward). Someone who joins
later costs one more preparation of the batch, after the first; at most one is made ahead per
batch, so a trickle of arrivals cannot keep the preparing thread busy. This is on only where
the forward runs off the CPU (`prepare_short_batches_ahead`, set by the service for a CUDA
router): with the forward on the same 2 CPUs, preparing beside it takes the CPU the forward
needs, and no gain was measurable (32 callers, 3 rounds each: fp32 40.1 against 45.2
posts/s, int8 61.1 against 62.2, while the in-process ceiling, which the batcher does not
touch, moved as much between the two runs; about half the batches prepared ahead were
prepared again; docs/performance.md). Everything the serial batcher
checked still holds: a batch whose callers all gave up or whose deadlines passed while it was
prepared is not run, one whose callers partly did is prepared again without them (before
the forward: nobody's forward pays for a caller who left), and the admission estimate is the
honest cycle, from when the model was free for the batch (or its first post arrived, if
later) to the end of its forward: 1 / max(prepare, forward) at saturation, gather + prepare +
forward at low load.

The preparing pool is one thread, not a set of processes. The heavy steps release the GIL
(the fast tokenizer's Rust batch encode, parallel inside already; PIL's resize; numpy and
torch arithmetic), and so does the forward inside torch's kernels, so the two stages overlap
on threads; what holds the GIL is short Python glue and the lexical head's n-gram analysis
(~2 ms a post). Measured on 2 shared CPUs (docs/performance.md, "Preparing while the model
runs"): a pure-Python thread kept 0.35 of its speed beside preparing, yet with a forward
that leaves the CPU free (a test device) the threads reach 0.86–0.88 of 1 / max(prepare,
forward) against 0.88–0.91 of 1 / (prepare + forward) serial. A process
would escape the GIL but pickle every post's images across and the tensors back (a batch of
32 posts with 2 images is 38 MB of pixels) and hold a copy of the tokenizer, image processor
and n-gram vocabularies per process: worth it only where preparing outgrows the forward, not
on these machines. One thread, because one batch is prepared at a time and a fast tokenizer
must not be called from two threads at once (`Router.prepare`); more workers would only take
CPU from the forward on a small machine.
"""

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app.model.post import Post
from app.service.admission_policy import AdmissionPolicy
from app.service.engine import Decision
from app.service.errors import DeadlineExceededError, QueueFullError
from app.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[Post]], list[Decision]]
# Builds a batch's inputs ahead of `RunBatch` (off the model thread), returning the posts in
# the form `RunBatch` takes: `RouterEngine.prepare`. The default leaves them as they are
# (everything then happens on the model thread, the serial batcher).
Prepare = Callable[[Sequence[Post]], Sequence[Post]]

# After this many single-post batches in a row, a lone post (nothing else queued or being
# decoded) goes to the model at once instead of waiting `max_wait_s` for company that has
# not come lately: at low load the wait buys no batching and costs every post its latency
# (a sequential caller: ~27 vs ~34 posts/s on the proxy router, docs/performance.md). Any
# batch of two or more turns the wait back on, so rising load batches as before.
SOLO_BATCHES = 3


@dataclass
class _Batch:
    items: list["_Pending"]
    started: float  # time.monotonic() when its first post left the queue: its cycle's start
    # Inputs of the batch's first `ahead_posts` posts, prepared while the model was busy and
    # the batch had gone quiet (`_prepare_ahead`); None if it never did.
    ahead: "asyncio.Task[Sequence[Post]] | None" = None
    ahead_posts: int = 0


@dataclass
class _Pending:
    post: Post
    deadline: float  # time.monotonic()
    future: asyncio.Future[Decision]
    unclaimed: Callable[[Decision], None] | None = None  # the decision of a cancelled future
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """A bounded queue in front of one model thread."""

    def __init__(
        self,
        run_batch: RunBatch,
        metrics: ServiceMetrics,
        *,
        prepare: Prepare | None = None,
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        retry_after_s: int = 1,
        model_thread_nice: int = 0,
        prepare_short_batches_ahead: bool = False,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1, max_wait_s >= 0")
        self._run_batch = run_batch
        self._prepare = prepare or _as_is
        # Worth it only where the forward leaves the CPU to the preparing (module doc).
        self._prepare_short_ahead = prepare_short_batches_ahead
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self.admission = AdmissionPolicy(
            capacity=queue_size,
            retry_after_s=retry_after_s,
            held=self._holding_room,
            ahead=lambda: self._holding_room() + self._in_model + self._reserved,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="radar-model",
            initializer=_lower_priority,
            initargs=(model_thread_nice,),
        )
        # The preparing thread (module doc: one thread, not processes), same priority.
        self._preparer = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="radar-prepare",
            initializer=_lower_priority,
            initargs=(model_thread_nice,),
        )
        self._task: asyncio.Task[None] | None = None
        self._forward_task: asyncio.Task[None] | None = None  # the batch on the model thread
        self._ahead: asyncio.Task[Sequence[Post]] | None = None  # `_prepare_ahead`'s, if running
        self._model_idle = asyncio.Event()
        self._model_idle.set()
        self._free_at = 0.0  # time.monotonic() when the model thread last finished a batch
        self._in_model = 0  # posts in the forward now running
        self._staged = 0  # posts out of the queue, not in the model yet (gathered, prepared)
        self._reserved = 0  # admitted posts not queued yet (images decoding)
        self._solo_streak = 0  # single-post batches in a row, just before this one
        metrics.track_queue(self._queue.qsize)
        metrics.track_claims(self.admission.claimed_posts)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The model thread: anything touching the model runs here."""
        return self._executor

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="radar-batcher")

    async def stop(self) -> None:
        for task in (self._task, self._forward_task, self._ahead):
            if task is not None:
                task.cancel()
                # A preparation ahead may have failed; its batch is gone with the loop.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._preparer.shutdown(wait=True)
        self._executor.shutdown(wait=True)

    def _holding_room(self) -> int:
        """Posts that take queue room: queued, and the batch gathered or prepared ahead of
        the model, which still waits."""
        return self._queue.qsize() + self._staged

    @property
    def _model_busy(self) -> bool:
        """A forward is running on the model thread."""
        return not self._model_idle.is_set()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @contextlib.contextmanager
    def admitted(self, posts: int, deadline: float) -> Iterator[None]:
        """`AdmissionPolicy.admit`, then count the posts as ahead of later arrivals until
        they are queued (leave the block after `submit`): while their images decode they are
        invisible to the queue, and a burst of requests would otherwise all be admitted at
        once."""
        self.admission.admit(posts, deadline)
        self._reserved += posts
        try:
            yield
        finally:
            self._reserved -= posts

    def submit(
        self,
        post: Post,
        deadline: float,
        unclaimed: Callable[[Decision], None] | None = None,
    ) -> asyncio.Future[Decision]:
        """Queue one post; raises `QueueFullError` at once when the queue is full.

        `unclaimed` (on the loop) gets the post's decision if the model computed it after the
        returned future was cancelled: the post was in the forward when its caller gave up.
        A post cancelled before its forward never runs.
        """
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(post, deadline, future, unclaimed))
        except asyncio.QueueFull:
            raise QueueFullError("the router's queue is full", self.retry_after_s) from None
        return future

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            try:
                await self._stage(batch)
            except Exception:  # the loop must outlive any one batch
                log.exception("batch of %d posts failed outside the model", len(batch.items))
                _fail(batch.items)
            finally:
                self._staged = 0

    async def _gather(self) -> _Batch:
        batch = _Batch([await self._queue.get()], time.monotonic())
        self._staged = 1
        wait = self.max_wait_s if self._worth_waiting() else 0.0
        while len(batch.items) < self.max_batch_size:
            try:
                item: _Pending | None = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = self._close_at(batch, wait) - time.monotonic()
                if remaining <= 0:
                    break
                item = await self._next_post(remaining)
                if item is None and self._model_busy and self._prepare_short_ahead:
                    self._prepare_ahead(batch)  # quiet for the wait, model still busy
            if item is not None:
                batch.items.append(item)
                self._staged = len(batch.items)
        self._solo_streak = self._solo_streak + 1 if len(batch.items) == 1 else 0
        return batch

    def _prepare_ahead(self, batch: _Batch) -> None:
        """Start preparing `batch` as it stands, once: it stays open (`_close_at`), and
        `_prepared_for` uses these inputs only if nobody joins it before it closes."""
        if batch.ahead is None:
            batch.ahead = asyncio.ensure_future(self._prepared(list(batch.items)))
            # Read its error, if any, even when the batch is dropped before using it.
            batch.ahead.add_done_callback(_retrieve)
            batch.ahead_posts = len(batch.items)
            self._ahead = batch.ahead

    def _worth_waiting(self) -> bool:
        """Whether to hold the batch open `max_wait_s` for more posts (see `SOLO_BATCHES`)."""
        alone = self._queue.empty() and self._reserved == 0
        return not (alone and self._solo_streak >= SOLO_BATCHES)

    def _close_at(self, batch: _Batch, wait: float) -> float:
        """When to stop gathering `batch` (a full one stops at once, in `_gather`): `wait`
        after its first post or, while the model is busy, `wait` after it is free, as a
        serial batcher would. The callers the running batch answers send again within that
        wait and fill this batch. Closing it earlier, to prepare it during the forward,
        split 32 closed-loop callers into two batches of 16 for good: 40.5 posts/s against
        LitServe's 58.6 (`benchmarks/serving_bench.py`, docs/performance.md). So only a full
        batch closes while the model runs; one short of full may be prepared meanwhile
        (`_prepare_ahead`, off the CPU only) but stays open until this time.
        """
        close = batch.started + wait
        if self._model_busy:  # until it is free: `_next_post` wakes then, and this moves
            return max(close, time.monotonic() + wait)
        if self._free_at > batch.started:  # the model became free while this one gathered
            return max(close, self._free_at + wait)
        return close

    async def _next_post(self, timeout: float) -> _Pending | None:
        """The next queued post within `timeout`; None at the timeout or, while the model
        is busy, as soon as it is free (the batch's closing time then moves up)."""
        getter = asyncio.ensure_future(self._queue.get())
        waiters: set[asyncio.Future[object]] = {getter}
        if self._model_busy:
            waiters.add(asyncio.ensure_future(self._model_idle.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        # Let the cancelled ones finish: a post taken meanwhile is either returned here or,
        # the get cancelled before it took it, left in the queue (asyncio.Queue.get).
        await asyncio.wait(waiters)
        return None if getter.cancelled() else getter.result()

    async def _stage(self, batch: _Batch) -> None:
        """Prepare `batch` while the model runs the one before, then start its forward."""
        now = time.monotonic()
        live = _wanted(batch.items, now)
        for item in live:
            self._metrics.queue_wait.observe(now - item.enqueued)
        self._staged = len(live)
        if not live:
            return
        posts = await self._prepared_for(batch, live)
        if self._forward_task is not None:  # the model is busy with the batch before
            await asyncio.wait({self._forward_task})
        wanted = _wanted(live, time.monotonic())
        if not wanted:
            return
        if len(wanted) < len(live):  # callers left while it was prepared: not run for them
            posts = await self._prepared(wanted)
        self._staged = 0
        loop = asyncio.get_running_loop()
        self._forward_task = loop.create_task(self._forward(batch.started, wanted, posts))

    async def _prepared_for(self, batch: _Batch, live: list[_Pending]) -> Sequence[Post]:
        """The posts of `live` (the batch's wanted items), prepared: the inputs prepared
        ahead while it gathered if they are of exactly these posts, or else prepared now,
        after the preparation ahead has finished (it holds the one preparing thread)."""
        ahead, self._ahead = batch.ahead, None
        if ahead is None:
            return await self._prepared(live)
        try:
            posts = await ahead
        except Exception:  # prepared again below, where a real error recurs and is handled
            log.debug("preparing ahead failed; preparing the batch again", exc_info=True)
        else:
            if batch.ahead_posts == len(batch.items) == len(live):  # nobody joined or left
                self._metrics.prepared_ahead.labels("used").inc()
                return posts
        self._metrics.prepared_ahead.labels("redone").inc()
        return await self._prepared(live)

    async def _prepared(self, items: list[_Pending]) -> Sequence[Post]:
        """The posts of `items`, prepared on the preparing thread."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        posts = await loop.run_in_executor(
            self._preparer, self._prepare, [item.post for item in items]
        )
        if len(posts) != len(items):
            raise RuntimeError(f"{len(posts)} posts prepared for {len(items)}")
        self._metrics.prepare_time.observe(time.monotonic() - started)
        return posts

    async def _forward(self, started: float, items: list[_Pending], posts: Sequence[Post]) -> None:
        """Run one prepared batch on the model thread and answer its posts (a task: the
        loop meanwhile gathers and prepares the next batch).

        `started`: when the batch's first post left the queue; its cycle
        (`AdmissionPolicy.record_cycle`) runs from then, or from when the model was free for
        it if that came later.
        """
        loop = asyncio.get_running_loop()
        begun = time.monotonic()
        self._in_model = len(items)
        self._model_idle.clear()
        try:
            answered = await loop.run_in_executor(self._executor, self._run_wanted, items, posts)
            finished = time.monotonic()
            self._account(started, begun, finished, len(answered))
            self._answer(items, answered)
        except Exception:  # the batcher must outlive any one batch
            log.exception("batch of %d posts failed outside the model", len(items))
            _fail(items)
        finally:
            self._in_model = 0
            self._free_at = max(self._free_at, time.monotonic())
            self._model_idle.set()

    def _account(self, started: float, begun: float, finished: float, answered: int) -> None:
        """Record one forward (`begun` to `finished`) in the metric, and the admission's
        estimate (`AdmissionPolicy.record_cycle`) from the batch's whole cycle."""
        self._metrics.forward_time.observe(finished - begun)
        if not answered:
            return
        # Per post of the whole cycle, not of the forward alone: under CPU contention the
        # time around the forward is what the forward-only estimate missed. The cycle starts
        # when the model was free for this batch (the pipeline's rate: 1 / max(prepare,
        # forward)) or, at low load, when its first post arrived (gather + prepare + forward).
        self.admission.record_cycle((finished - max(started, self._free_at)) / answered)
        self._free_at = finished

    def _answer(self, items: list[_Pending], answered: dict[int, Decision]) -> None:
        for item in items:
            decision = answered.get(id(item))
            if item.future.done():
                if decision is not None and item.future.cancelled():
                    _hand_back(item, decision)  # computed for a caller that stopped waiting
                continue
            if decision is not None:
                item.future.set_result(decision)
            else:  # its deadline passed while the model thread was busy
                item.future.set_exception(DeadlineExceededError("deadline passed in the queue"))

    def _run_wanted(self, items: list[_Pending], posts: Sequence[Post]) -> dict[int, Decision]:
        """On the model thread: run the prepared `posts` of `items` if any is still wanted
        *now*; decisions keyed by `id(item)`, none for a post whose deadline has passed.

        The model thread may have been busy since the batch was prepared; callers that all
        gave up meanwhile (a cancellation storm) must not cost a forward pass. One who left
        in the instant since the loop last looked (`_stage`) is run with the rest: its
        decision goes to `unclaimed`. `future.done()` is a single state read, safe from this
        thread; results are set on the loop.
        """
        now = time.monotonic()
        if not any(not item.future.done() and now < item.deadline for item in items):
            return {}
        self._metrics.batch_size.observe(len(posts))
        decisions = self._run_batch(posts)
        if len(decisions) != len(items):
            raise RuntimeError(f"{len(decisions)} decisions for {len(items)} posts")
        pairs = zip(items, decisions, strict=True)
        return {id(item): decision for item, decision in pairs if now < item.deadline}


def _wanted(items: list[_Pending], now: float) -> list[_Pending]:
    """The items still wanted: not given up by their caller (cancelled future), and before
    their deadline (a passed one is failed here)."""
    wanted = []
    for item in items:
        if item.future.done():
            continue
        if now >= item.deadline:
            item.future.set_exception(DeadlineExceededError("deadline passed in the queue"))
            continue
        wanted.append(item)
    return wanted


def _retrieve(task: "asyncio.Task[Sequence[Post]]") -> None:
    if not task.cancelled():
        task.exception()


def _fail(items: list[_Pending]) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(RuntimeError("internal batching error"))


def _as_is(posts: Sequence[Post]) -> Sequence[Post]:
    return posts


def _hand_back(item: _Pending, decision: Decision) -> None:
    """A decision whose caller stopped waiting, to the post's `unclaimed` callback."""
    if item.unclaimed is None:
        return
    try:
        item.unclaimed(decision)
    except Exception:  # the other posts of the batch still get their answers
        log.exception("handling an unclaimed decision failed")


def _lower_priority(nice: int) -> None:
    """On the model thread: a higher nice value than the event loop's (Linux: per thread).

    When CPUs are short, the loop's work per request (reading, refusing with 503, sending
    answers) is small and latency-critical, the model's is large: giving the loop the CPU
    first keeps refusals fast and answers in time under overload (docs/reliability.md).
    """
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError) as exc:  # not Linux, or not permitted: carry on
        log.warning("model thread priority unchanged: %s", exc)
