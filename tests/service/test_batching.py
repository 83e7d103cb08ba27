"""Dynamic batching, backpressure and deadlines, through the real ASGI app."""

import asyncio
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from app.model.post import Post
from app.service.errors import DeadlineExceededError
from app.service.state import ServiceState
from tests.service.conftest import post


def sample(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and (labels is None or s.labels == labels):
                return s.value
    raise KeyError(name)


def model_posts(n: int) -> list[Post]:
    return [Post(title=f"queued {i}", ocr_text="") for i in range(n)]


def count_forwards(state: ServiceState) -> list[int]:
    """Wrap the router's forward: the returned list gets each forward's batch size."""
    forwards: list[int] = []
    real_forward = state.running.router.forward

    def counting(inputs):
        forwards.append(int(inputs["input_ids"].shape[0]))
        return real_forward(inputs)

    state.running.router.forward = counting
    return forwards


async def test_concurrent_requests_share_one_forward(running) -> None:
    async with running(max_batch_size=8, max_wait_ms=500) as (client, state):
        forwards = count_forwards(state)
        responses = await asyncio.gather(
            *(client.post("/route", json=post(f"s{i}", "x " * i)) for i in range(8))
        )
        text = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in responses)
    assert forwards == [8]  # one forward pass for eight callers
    assert sample(text, "radar_batch_size_count") == 1
    assert sample(text, "radar_batch_size_sum") == 8


def block_model_thread(state) -> threading.Event:
    """Occupy the single model thread until the returned event is set."""
    release = threading.Event()
    state.running.batcher.executor.submit(release.wait, 10)
    return release


async def test_full_queue_answers_503_with_retry_after_at_once(running) -> None:
    async with running(max_batch_size=1, queue_size=1, max_wait_ms=0) as (client, state):
        release = block_model_thread(state)
        first = asyncio.create_task(client.post("/route", json=post("a")))  # gathered, waits
        await asyncio.sleep(0.1)
        second = asyncio.create_task(client.post("/route", json=post("b")))  # fills the queue
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        third = await client.post("/route", json=post("c"))
        elapsed = loop.time() - started
        release.set()
        answered = await asyncio.gather(first, second)
    assert third.status_code == 503
    assert third.headers["Retry-After"] == "1"
    assert third.json()["error"] == "queue_full"
    # Queued, it would have waited for the model thread, blocked for 10 s: it did not.
    assert elapsed < 5
    assert [r.status_code for r in answered] == [200, 200]


async def test_deadline_gives_504_and_the_batcher_survives(running) -> None:
    # A generous deadline: on a shared CPU one tiny forward can take hundreds of ms.
    async with running(deadline_ms=1000, max_wait_ms=1) as (client, state):
        release = block_model_thread(state)
        late = await client.post("/route/batch", json={"posts": [post(f"late{i}") for i in "abc"]})
        release.set()
        await asyncio.sleep(0.05)
        after = await client.post("/route", json=post("after"))
        text = (await client.get("/metrics")).text
    assert late.status_code == 504 and late.json()["error"] == "deadline_exceeded"
    assert after.status_code == 200
    # One refused request, whatever its three posts did: the unit is requests.
    assert sample(text, "radar_rejected_total", {"reason": "deadline"}) == 1


async def test_posts_past_their_deadline_in_the_queue_are_not_counted_as_requests(
    running,
) -> None:
    """The batcher fails each expired post; only the edge counts the request it belongs to
    (it once counted every post here, and the request again at its 504)."""
    async with running(deadline_ms=1000, max_wait_ms=1) as (client, state):
        release = block_model_thread(state)
        futures = [state.running.batcher.submit(p, time.monotonic() + 0.05) for p in model_posts(3)]
        await asyncio.sleep(0.1)  # past the deadline while the model thread is held
        release.set()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        text = (await client.get("/metrics")).text
    assert all(isinstance(o, DeadlineExceededError) for o in outcomes), outcomes
    assert sample(text, "radar_rejected_total", {"reason": "deadline"}) == 0


async def test_callers_that_give_up_do_not_stall_the_batcher(running) -> None:
    async with running(max_batch_size=4, max_wait_ms=5) as (client, state):
        release = block_model_thread(state)
        quitters = [
            asyncio.create_task(client.post("/route", json=post(f"q{i}"))) for i in range(20)
        ]
        await asyncio.sleep(0.1)
        for task in quitters:
            task.cancel()
        await asyncio.gather(*quitters, return_exceptions=True)
        release.set()
        responses = await asyncio.gather(
            *(client.post("/route", json=post(f"n{i}")) for i in range(6))
        )
        assert state.running.batcher.alive
    assert [r.status_code for r in responses] == [200] * 6


async def test_lone_posts_skip_the_wait_at_low_load_and_batching_resumes(running) -> None:
    # A long deadline: the admission's cost estimate counts the first posts' 1 s waits.
    async with running(max_batch_size=8, max_wait_ms=1000, deadline_ms=60000) as (client, state):
        forwards = count_forwards(state)
        latencies = []
        for i in range(6):  # one caller at a time
            started = asyncio.get_running_loop().time()
            assert (await client.post("/route", json=post(f"q{i}", "x"))).status_code == 200
            latencies.append(asyncio.get_running_loop().time() - started)
        # The first three wait the full max_wait for company; then lone posts go at once.
        assert all(t >= 1.0 for t in latencies[:3]), latencies
        assert all(t < 0.8 for t in latencies[3:]), latencies

        async def burst(tag: str) -> None:
            responses = await asyncio.gather(
                *(client.post("/route", json=post(f"{tag}{i}", "x " * i)) for i in range(8))
            )
            assert all(r.status_code == 200 for r in responses)

        await burst("a")  # the first of a sudden burst may go alone ...
        assert sum(forwards[6:]) == 8 and len(forwards[6:]) <= 2, forwards
        del forwards[:]
        await burst("b")  # ... after which the wait is back: eight callers, one forward
    assert forwards == [8]
