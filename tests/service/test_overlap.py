"""Preparing batch n + 1 while batch n runs (issue 15, item 2): the real batcher and engine
on the tiny model, its input building and its forward each made slow on purpose (a sleep, so
the test measures the batcher's schedule, not this machine's CPU)."""

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from app.model.post import Post
from app.model.router import PreparedBatch
from app.model.store import load_router
from app.service.batcher import DynamicBatcher
from app.service.engine import Decision, RouterEngine
from app.service.metrics import ServiceMetrics
from app.thresholds import load_thresholds
from tests.service.conftest import categories_of, post

PREPARE_S = 0.15  # building one batch's inputs
FORWARD_S = 0.15  # one batch's forward
BATCH = 4
BATCHES = 6

Interval = tuple[float, float, str]  # start, end, the batch: "first title/posts"


def _slowed(real: Callable[[Any], Any], seconds: float, log: list[Interval], label: Callable):
    def slow(arg):
        start = time.monotonic()
        time.sleep(seconds)
        out = real(arg)
        log.append((start, time.monotonic(), label(arg)))  # list.append: atomic
        return out

    return slow


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as the app's tests run (`make_settings`): two threads running
    torch ops at once (preparing, forward) with a team of OpenMP threads each stall on a
    busy 2-CPU machine for hundreds of ms, which would be the machine, not the schedule."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def engine(tiny_store: Path) -> RouterEngine:
    return RouterEngine(load_router(tiny_store, "cpu"))


def _batcher(engine: RouterEngine, thresholds_path: Path, prepare: bool) -> DynamicBatcher:
    active = load_thresholds(thresholds_path, engine.categories, engine.router.config.model_version)
    return DynamicBatcher(
        lambda posts: engine.route(posts, active),
        ServiceMetrics(),
        prepare=engine.prepare if prepare else None,
        max_batch_size=BATCH,
        max_wait_s=0.0,
        queue_size=BATCH * BATCHES,
    )


def _posts(n: int, poison: int | None = None) -> list[Post]:
    return [Post(title="poison" if i == poison else f"post {i}") for i in range(n)]


async def _route_all(batcher: DynamicBatcher, posts: Sequence[Post]) -> list[Decision]:
    batcher.start()
    try:
        deadline = time.monotonic() + 60
        return await asyncio.gather(*(batcher.submit(post, deadline) for post in posts))
    finally:
        await batcher.stop()


def _slow_down(engine: RouterEngine) -> tuple[list[Interval], list[Interval]]:
    """Sleep in the router's input building and in its forward; each logs its intervals,
    named by the batch: its first post's title and its size, e.g. "post 4/1"."""
    router = engine.router
    built: list[Interval] = []
    forwarded: list[Interval] = []
    names: dict[int, str] = {}  # the forward gets tensors: named by the build that made them
    real_build = router.build_inputs

    def naming_build(posts):
        inputs = real_build(posts)
        names[id(inputs["input_ids"])] = f"{posts[0].title}/{len(posts)}"
        return inputs

    router.build_inputs = _slowed(
        naming_build, PREPARE_S, built, lambda posts: f"{posts[0].title}/{len(posts)}"
    )
    router.forward = _slowed(
        router.forward, FORWARD_S, forwarded, lambda inputs: names[id(inputs["input_ids"])]
    )
    return built, forwarded


def _overlaps(a: Interval, b: Interval) -> bool:
    return a[0] < b[1] and b[0] < a[1]


async def test_the_next_batch_is_prepared_while_the_model_runs(engine, thresholds_path) -> None:
    built, forwarded = _slow_down(engine)
    batcher = _batcher(engine, thresholds_path, prepare=True)
    started = time.monotonic()
    decisions = await _route_all(batcher, _posts(BATCH * BATCHES))
    elapsed = time.monotonic() - started
    assert len(decisions) == BATCH * BATCHES
    assert all(d.fallback_reason is None for d in decisions)
    # Every batch was built once and run once, in order, as a full batch.
    firsts = [f"post {i * BATCH}/{BATCH}" for i in range(BATCHES)]
    assert [b[2] for b in sorted(built)] == firsts
    assert [f[2] for f in sorted(forwarded)] == firsts
    built.sort()
    forwarded.sort()
    # Building batch n + 1 overlapped batch n's forward, for every n.
    for n in range(BATCHES - 1):
        assert _overlaps(built[n + 1], forwarded[n]), (n, built, forwarded)
    # So the whole took about one build plus the forwards, not their sum: the serial sum is
    # 1.8 s and the pipeline's ideal 1.05 s; the bound leaves 0.39 s for a busy machine.
    serial = BATCHES * (PREPARE_S + FORWARD_S)
    assert elapsed < 0.8 * serial, (elapsed, serial, built, forwarded)
    # The admission estimate measured the pipeline's cycle, max(prepare, forward) per batch,
    # not the sum (its first batch, gathered from idle, did cost the sum).
    assert batcher.admission.post_cost_s is not None
    assert batcher.admission.post_cost_s < 0.9 * (PREPARE_S + FORWARD_S) / BATCH


async def test_a_batch_short_of_full_waits_for_the_callers_the_model_answers(
    engine, thresholds_path
) -> None:
    """Closed-loop callers: while batch A runs, two posts queue; A's callers send again as
    soon as they are answered. Prepared ahead, the two would have gone alone and split the
    callers into two half batches for good; held until the model is free plus the wait,
    they go with A's callers in one full batch."""
    _, forwarded = _slow_down(engine)
    active = load_thresholds(thresholds_path, engine.categories, engine.router.config.model_version)
    batcher = DynamicBatcher(
        lambda posts: engine.route(posts, active),
        ServiceMetrics(),
        prepare=engine.prepare,
        max_batch_size=BATCH,
        max_wait_s=0.1,
        queue_size=4 * BATCH,
    )
    batcher.start()
    try:
        deadline = time.monotonic() + 60
        first = [batcher.submit(p, deadline) for p in _posts(BATCH // 2)]
        await asyncio.sleep(0.1 + PREPARE_S + 0.05)  # gathered, prepared: in the model now
        waiting = [batcher.submit(Post(title=f"waiting {i}"), deadline) for i in range(2)]
        await asyncio.gather(*first)
        again = [batcher.submit(Post(title=f"again {i}"), deadline) for i in range(2)]
        await asyncio.gather(*waiting, *again)
    finally:
        await batcher.stop()
    assert sorted(f[2].split("/")[1] for f in forwarded) == ["2", "4"], forwarded


def _gathering_batcher(
    engine: RouterEngine, thresholds_path: Path, wait_s: float, short_ahead: bool = True
):
    active = load_thresholds(thresholds_path, engine.categories, engine.router.config.model_version)
    return DynamicBatcher(
        lambda posts: engine.route(posts, active),
        ServiceMetrics(),
        prepare=engine.prepare,
        max_batch_size=BATCH,
        max_wait_s=wait_s,
        queue_size=4 * BATCH,
        prepare_short_batches_ahead=short_ahead,  # the slowed forward stands in for a device
    )


@pytest.mark.parametrize("short_ahead", [True, False])
async def test_a_quiet_batch_short_of_full_is_prepared_during_the_forward(
    engine, thresholds_path, short_ahead: bool
) -> None:
    """Two posts arrive while a full batch runs and nobody else comes: their batch is
    prepared while the model runs (not once it is free, which made a cycle of prepare +
    forward for 32 callers in two cohorts of 16), once, and run with those inputs. Not with
    the forward on the CPU (the service's setting there): it would share the CPU."""
    built, forwarded = _slow_down(engine)
    batcher = _gathering_batcher(engine, thresholds_path, 0.02, short_ahead)
    batcher.start()
    try:
        deadline = time.monotonic() + 60
        full = [batcher.submit(p, deadline) for p in _posts(BATCH)]
        await asyncio.sleep(PREPARE_S + 0.03)  # the full batch is in its forward now
        short = [batcher.submit(Post(title=f"short {i}"), deadline) for i in range(2)]
        decisions = await asyncio.gather(*full, *short)
    finally:
        await batcher.stop()
    assert all(d.fallback_reason is None for d in decisions)
    built.sort()
    forwarded.sort()
    assert [b[2] for b in built] == [f"post 0/{BATCH}", "short 0/2"], built  # built once
    assert [f[2] for f in forwarded] == [f"post 0/{BATCH}", "short 0/2"]
    assert _overlaps(built[1], forwarded[0]) == short_ahead, (built, forwarded)
    assert _prepared_ahead(batcher) == {"used": float(short_ahead), "redone": 0.0}


async def test_a_post_joining_a_batch_prepared_ahead_is_run_with_it(
    engine, thresholds_path
) -> None:
    """The batch prepared ahead stays open: a caller answered by the running batch who sends
    again within the wait joins it, and the batch is prepared again with the newcomer."""
    built, forwarded = _slow_down(engine)
    batcher = _gathering_batcher(engine, thresholds_path, wait_s=0.05)
    batcher.start()
    try:
        deadline = time.monotonic() + 60
        full = [batcher.submit(p, deadline) for p in _posts(BATCH)]
        # Gathered once the full batch is in its forward (0.15 s, three times the wait).
        short = [batcher.submit(Post(title=f"short {i}"), deadline) for i in range(2)]
        await asyncio.gather(*full)
        late = batcher.submit(Post(title="late"), deadline)  # within the wait after free
        decisions = await asyncio.gather(*short, late)
    finally:
        await batcher.stop()
    assert all(d.fallback_reason is None for d in decisions)
    assert sorted(b[2] for b in built) == sorted([f"post 0/{BATCH}", "short 0/2", "short 0/3"])
    assert sorted(f[2] for f in forwarded) == [f"post 0/{BATCH}", "short 0/3"], forwarded
    assert _prepared_ahead(batcher) == {"used": 0.0, "redone": 1.0}


def _prepared_ahead(batcher: DynamicBatcher) -> dict[str, float]:
    counter = batcher._metrics.prepared_ahead
    return {outcome: counter.labels(outcome)._value.get() for outcome in ("used", "redone")}


async def test_without_a_prepare_step_the_batcher_is_serial(engine, thresholds_path) -> None:
    """The control for the test above: inputs built on the model thread never overlap."""
    built, forwarded = _slow_down(engine)
    batcher = _batcher(engine, thresholds_path, prepare=False)
    await _route_all(batcher, _posts(BATCH * 3))
    built.sort()
    forwarded.sort()
    assert len(built) == len(forwarded) == 3
    for n in range(2):
        assert not _overlaps(built[n + 1], forwarded[n])


async def test_a_batch_that_fails_to_prepare_falls_back_alone(
    engine, thresholds_path, tiny_store
) -> None:
    router = engine.router
    real_build = router.build_inputs

    def build(posts):
        if any(post.title == "poison" for post in posts):
            raise ValueError("injected: cannot build")
        return real_build(posts)

    router.build_inputs = build
    batcher = _batcher(engine, thresholds_path, prepare=True)
    decisions = await _route_all(batcher, _posts(BATCH * 3, poison=BATCH + 1))
    failed = decisions[BATCH : 2 * BATCH]  # the second batch, the one holding the poison
    for decision in failed:
        assert decision.fallback_reason == "model_error" and decision.scores == {}
        assert decision.dispatch == categories_of(tiny_store) and not decision.auto_pass
    for decision in decisions[:BATCH] + decisions[2 * BATCH :]:
        assert decision.fallback_reason is None and decision.scores


async def test_callers_who_leave_while_their_batch_is_prepared_are_not_run(
    engine, thresholds_path
) -> None:
    _, forwarded = _slow_down(engine)
    batcher = _batcher(engine, thresholds_path, prepare=True)
    batcher.start()
    try:
        deadline = time.monotonic() + 60
        futures = [batcher.submit(post, deadline) for post in _posts(BATCH * 2)]
        await asyncio.sleep(PREPARE_S * 1.5)  # batch 1 in its forward, batch 2 preparing
        for future in futures[BATCH + 1 :]:
            future.cancel()  # three of batch 2's four callers leave
        kept = await asyncio.gather(*futures[: BATCH + 1])
    finally:
        await batcher.stop()
    assert all(d.fallback_reason is None for d in kept)
    # Batch 2 ran for the one caller left (built again without the others), nobody else.
    assert [f[2] for f in sorted(forwarded)] == [f"post 0/{BATCH}", f"post {BATCH}/1"]
    assert all(future.cancelled() for future in futures[BATCH + 1 :])
    assert batcher._staged == 0 and batcher._in_model == 0


def test_prepared_inputs_give_the_same_scores(engine) -> None:
    """The CPU path is unchanged: a prepared batch scores exactly as the posts do."""
    posts = _posts(5)
    prepared = engine.router.prepare(posts)
    assert isinstance(prepared, PreparedBatch) and list(prepared) == posts
    assert engine.router.predict_proba(prepared).equal(engine.router.predict_proba(posts))


async def test_the_service_prepares_while_the_model_runs(running) -> None:
    """Through `/route/batch`: the app's batcher is built with the engine's prepare step."""
    async with running(max_batch_size=BATCH, max_wait_ms=0, deadline_ms=30000) as (
        client,
        state,
    ):
        built, forwarded = _slow_down(state.running.engine)
        body = {"posts": [post(f"p{i}", f"post {i}") for i in range(BATCH * 3)]}
        response = await client.post("/route/batch", json=body)
    assert response.status_code == 200, response.text
    assert all(r["flags"] == [] for r in response.json()["results"])
    built.sort()
    forwarded.sort()
    assert [f[2] for f in forwarded] == [f"post {i * BATCH}/{BATCH}" for i in range(3)]
    assert _overlaps(built[1], forwarded[0]) and _overlaps(built[2], forwarded[1])
