"""Fair admission between concurrent callers (issue 14, item 6), through the real ASGI app on
the tiny model made slow on purpose: every forward sleeps a fixed time per post, so the
measured cost per post, and with it admission, behaves like a real model's on a busy CPU.

Caller A streams single posts; caller B sends 64-post batches and retries each 503.
Before the fix, B's 64 posts were weighed whole against `ADMIT_SHARE` of the deadline and B
was refused whenever anything at all was queued; under overload, A's single posts filled
every gap B could have used (both tests failed: B got 10 consecutive 503s).
"""

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text as sql

from app.service.admission_policy import CLAIM_RETRIES, FINISH_SHARE
from app.service.errors import OverloadedError
from tests.logs import reading
from tests.service.conftest import post
from tests.service.test_batching import block_model_thread, sample

PER_POST_S = 0.008  # model time per post
COST_S = 0.010  # what admission assumes per post (`pin_cost`)
B_POSTS = 64


def pin_cost(state: Any, cost_s: float) -> None:
    """Hold the admission's cost estimate at `cost_s` a post (above the slow router's real
    cost, so the queue drains faster than admission assumes): on a shared 2-CPU machine the
    measured cost swings 8-17 ms a post from run to run, and these tests are about the rule."""
    state.running.batcher.admission.post_cost_s = cost_s
    state.running.batcher.admission.record_cycle = lambda per_post_s: None


def slow_router(state: Any, per_post_s: float = PER_POST_S) -> list[int]:
    """Make every forward sleep `per_post_s` a post; the list gets each batch's size."""
    sizes: list[int] = []
    real = state.running.router.predict_proba

    def slow(posts):
        sizes.append(len(posts))
        time.sleep(per_post_s * len(posts))
        return real(posts)

    state.running.router.predict_proba = slow
    return sizes


RETRY_PAUSE_S = 0.25  # B's pause after a 503 (Retry-After, shortened for the test)


async def stream_singles(client, every_s: float, stop: asyncio.Event, codes: Counter) -> None:
    """Caller A: one single-post request every `every_s` until `stop`, each sent without
    waiting for the one before, as uploads arrive (an open stream, not a closed loop)."""
    sent: list[asyncio.Task] = []

    async def one(i: int) -> None:
        codes[(await client.post("/route", json=post(f"a-{i}"))).status_code] += 1

    i = 0
    while not stop.is_set():
        sent.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(every_s)
    await asyncio.gather(*sent)


async def batch_caller(client, attempts: int, pause_s: float) -> list[int]:
    """Caller B: a 64-post batch, retried after each 503; the status of every attempt."""
    statuses: list[int] = []
    for attempt in range(attempts):
        body = {"posts": [post(f"b{attempt}-{i}") for i in range(B_POSTS)]}
        response = await client.post("/route/batch", json=body)
        statuses.append(response.status_code)
        if response.status_code != 503:
            break
        await asyncio.sleep(pause_s)
    return statuses


async def _two_callers(
    running, every_s: float, deadline_ms: float
) -> tuple[list[int], Counter, Counter, Any]:
    settings = {"deadline_ms": deadline_ms, "max_batch_size": 32, "max_wait_ms": 1}
    async with running(**settings) as (client, state):
        slow_router(state)
        pin_cost(state, COST_S)
        stop = asyncio.Event()
        codes: Counter = Counter()
        a = asyncio.create_task(stream_singles(client, every_s, stop, codes))
        await asyncio.sleep(0.5)  # A routing
        before = Counter(codes)
        b = await batch_caller(client, attempts=10, pause_s=RETRY_PAUSE_S)
        during = codes - before
        await asyncio.sleep(0.3)
        stop.set()
        await a
        return b, codes, during, state


async def test_a_batch_caller_is_served_while_a_single_post_caller_keeps_routing(running) -> None:
    # A at ~80 % of capacity (a post every 10 ms, 8 ms each): a few posts are nearly always
    # ahead. B's 64 posts (0.64 s at the assumed 10 ms) fit the default 2 s deadline with
    # ~90 posts ahead; weighed whole against 0.3 x 2 s, as before, never while one was.
    b, codes, during, _ = await _two_callers(running, every_s=0.010, deadline_ms=2000)
    assert b[-1] == 200, b
    assert len(b) <= 3, b  # served within a bounded number of attempts, not starved
    assert during[200] > 0  # A kept routing while B was trying
    assert set(codes) <= {200, 503}, codes


async def test_under_overload_small_requests_cannot_starve_a_batch(running) -> None:
    # A at ~2x capacity (a post every 4 ms): admission refuses part of it (the overload
    # protection) and holds the queue at ~30 posts (0.3 x 1 s / 10 ms). B fits a drained
    # queue (0.64 s < 0.8 x 1 s) but only with at most 16 posts ahead: without its claim
    # single posts took every gap and B got 10 consecutive 503s here.
    b, codes, during, state = await _two_callers(running, every_s=0.004, deadline_ms=1000)
    assert b[-1] == 200, b
    # Bounded, not starved (10 of 10 refused without claims); in a loaded full-suite run the
    # 5th attempt got in once, so the bound leaves the machine a little room.
    assert len(b) <= 6, b
    assert during[200] > 0
    assert codes[503] > 0  # more load than capacity is still refused
    assert set(codes) <= {200, 503}, codes
    text = (await _metrics(state)).decode()
    assert 'radar_rejected_total{reason="overloaded"}' in text


async def _metrics(state) -> bytes:
    return state.metrics.render()


def test_the_arithmetic_the_tests_rely_on() -> None:
    assert B_POSTS * PER_POST_S < FINISH_SHARE * 1.0 < B_POSTS * PER_POST_S + 0.3 * 1.0


async def test_a_refused_batch_keeps_its_room_until_its_retry(running) -> None:
    async with running(deadline_ms=1000) as (_, state):
        batcher = state.running.batcher
        batcher.admission.post_cost_s, batcher._in_model = 0.01, 29  # 29 posts ahead, 10 ms each

        def soon() -> float:  # a fresh 1 s deadline for each check
            return time.monotonic() + 1.0

        batcher.admission.admit(1, soon())  # a single post: 0.29 s of wait (< 0.3 s), admitted
        with pytest.raises(OverloadedError):
            batcher.admission.admit(B_POSTS, soon())  # 0.93 s to finish > 0.8 s: refused, room kept
        assert batcher.admission.claimed_posts() == B_POSTS
        gauge = sample(text_of(state), "radar_admission_claimed_posts")
        with pytest.raises(OverloadedError):
            batcher.admission.admit(1, soon())  # 29 + 1 + 64 claimed posts: 0.94 s > 0.8 s
        batcher._in_model = 15  # drained to what the batch needs
        with pytest.raises(OverloadedError):
            batcher.admission.admit(1, soon())  # 15 + 1 + 64: 0.80 s, still not
        # The batch's retry: 15 + 64 fits, and its claim goes.
        batcher.admission.admit(B_POSTS, soon())
        assert batcher.admission.claimed_posts() == 0
        batcher.admission.admit(1, soon())
        # A request that could not finish even in an empty queue claims nothing.
        with pytest.raises(OverloadedError):
            batcher.admission.admit(90, soon())
        assert batcher.admission.claimed_posts() == 0
        # A claim whose caller never came back lapses after CLAIM_RETRIES x Retry-After.
        with pytest.raises(OverloadedError):
            batcher.admission.admit(B_POSTS, time.monotonic() + 0.9)  # 0.79 s > 0.72 s
        lapses = batcher.admission._claims[B_POSTS] - time.monotonic()
        assert CLAIM_RETRIES * state.settings.retry_after_s - 0.1 < lapses
        batcher.admission._claims[B_POSTS] = time.monotonic() - 1e-3  # as if that time had passed
        assert batcher.admission.claimed_posts() == 0
        # The middleware's check before the body (size unknown) never counts claims.
        batcher.admission._claims[B_POSTS] = time.monotonic() + 10
        batcher.admission.admit(1, soon(), pending=0, claims=False)
    assert gauge == B_POSTS


def text_of(state) -> str:
    return state.metrics.render().decode()


def _rows(state) -> list[tuple]:
    state.running.decision_log.flush()
    with reading(state.settings.decision_log_location) as conn:
        query = "SELECT post_id, category, unanswered FROM decisions ORDER BY post_id, category"
        return [tuple(row) for row in conn.execute(sql(query))]


def slow_titles(state, seconds: float) -> list[str]:
    """Forwards of posts titled "slow" sleep `seconds`; the list gets every forwarded title."""
    titles: list[str] = []
    real = state.running.router.predict_proba

    def predict(posts):
        titles.extend(p.title for p in posts)
        if any(p.title == "slow" for p in posts):
            time.sleep(seconds)
        return real(posts)

    state.running.router.predict_proba = predict
    return titles


async def test_decisions_computed_for_a_504_are_logged_as_unanswered(running) -> None:
    # One post a forward: "fast" is decided at once, "slow" is in the forward when the
    # 300 ms deadline passes and comes out of it after the 504 has left.
    async with running(deadline_ms=300, max_wait_ms=1, max_batch_size=1) as (client, state):
        titles = slow_titles(state, 0.6)
        body = {"posts": [post("p-fast", "fast"), post("p-slow", "slow")]}
        late = await client.post("/route/batch", json=body)
        await asyncio.sleep(0.6)  # the forward finishes
        after = await client.post("/route", json=post("p-after", "fine"))
        rows = _rows(state)
        text = text_of(state)
    categories = sorted({row[1] for row in rows})
    assert late.status_code == 504 and after.status_code == 200
    assert titles == ["fast", "slow", "fine"]
    by_post: dict[str, set] = {}
    for post_id, _, unanswered in rows:
        by_post.setdefault(post_id, set()).add(unanswered)
    # Every category of both posts of the 504, flagged; the answered post not.
    assert by_post == {"p-fast": {"deadline"}, "p-slow": {"deadline"}, "p-after": {None}}
    assert len(rows) == 3 * len(categories)
    assert sample(text, "radar_unanswered_posts_total", {"reason": "deadline"}) == 2
    assert sample(text, "radar_posts_total") == 1  # only the answered post is "routed"


async def test_a_post_cancelled_before_its_forward_costs_none_and_logs_nothing(running) -> None:
    async with running(deadline_ms=300, max_wait_ms=1) as (client, state):
        titles = slow_titles(state, 0.0)
        release = block_model_thread(state)
        late = await client.post("/route", json=post("p-late", "late"))
        release.set()
        after = await client.post("/route", json=post("p-after", "fine"))
        rows = _rows(state)
        text = text_of(state)
    assert late.status_code == 504 and after.status_code == 200
    assert titles == ["fine"]  # the cancelled post never reached the model
    assert {row[0] for row in rows} == {"p-after"}
    assert sample(text, "radar_unanswered_posts_total", {"reason": "deadline"}) == 0
