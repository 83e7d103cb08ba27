"""Admission control and callers that hang up, through the real app on the tiny model."""

import asyncio
import json

from app.service.admission_policy import ADMIT_SHARE, FINISH_SHARE
from tests.service.conftest import post
from tests.service.test_batching import block_model_thread, sample

JSON = {"content-type": "application/json"}


async def test_overload_is_refused_before_the_body_is_read(running) -> None:
    read = {"chunks": 0}

    async def body():
        read["chunks"] += 1
        yield json.dumps(post("late")).encode()

    async with running(deadline_ms=1000) as (client, state):
        # As if each post took 0.2 s of model time with 10 posts queued: 2 s > 0.3 x 1 s.
        state.running.batcher.admission.post_cost_s = 0.2
        state.running.batcher._in_model = 10
        refused = await client.post("/route", content=body(), headers=JSON)
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        text = (await client.get("/metrics")).text
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "overloaded"
    assert refused.headers["Retry-After"] == "1"
    # The body generator was never pulled: refused from the headers alone. (No wall-clock
    # bound here: CI's shared CPU once took 0.83 s over a refusal that read nothing.)
    assert read["chunks"] == 0
    assert health.status_code == 200 and ready.status_code == 200  # probes still answer
    assert sample(text, "radar_rejected_total", {"reason": "overloaded"}) == 1


async def test_a_batch_is_admitted_by_its_post_count(running) -> None:
    async with running(deadline_ms=1000) as (client, state):
        # One post in the model, 0.04 s per post: the wait ahead of any request is 0.04 s
        # (< 0.3 of 1 s); with its own posts, ten finish by 0.44 s (< 0.8 of 1 s: admitted),
        # twenty-five by 1.04 s (refused).
        state.running.batcher.admission.post_cost_s, state.running.batcher._in_model = 0.04, 1
        ten = await client.post("/route/batch", json={"posts": [post(f"a{i}") for i in range(10)]})
        state.running.batcher.admission.post_cost_s, state.running.batcher._in_model = 0.04, 1
        many = {"posts": [post(f"b{i}") for i in range(25)]}
        refused = await client.post("/route/batch", json=many)
    assert ten.status_code == 200
    assert refused.status_code == 503 and refused.json()["error"] == "overloaded"
    assert 0.04 * 11 < FINISH_SHARE * 1.0 < 0.04 * 26 and ADMIT_SHARE * 1.0 > 0.04


async def test_an_idle_router_admits_whatever_its_estimate(running) -> None:
    async with running(deadline_ms=1000) as (client, state):
        # One pathological batch (a stall) set this:
        state.running.batcher.admission.post_cost_s = 5.0
        response = await client.post("/route/batch", json={"posts": [post("a"), post("b")]})
        cost = state.running.batcher.admission.post_cost_s
    assert response.status_code == 200  # nothing ahead: nothing to wait for
    assert cost < 5.0  # and the estimate recovers with every batch


async def test_the_estimate_follows_measured_batches(running) -> None:
    async with running() as (client, state):
        # Nothing measured: no refusal.
        assert state.running.batcher.admission.expected_wait_s() == 0.0
        for i in range(3):
            await client.post("/route", json=post(f"m{i}"))
        cost = state.running.batcher.admission.post_cost_s
    assert cost is not None and 0 < cost < 1.0


async def test_a_caller_that_hangs_up_costs_no_forward_pass(running) -> None:
    async with running(max_wait_ms=1) as (client, state):
        app_call = client._transport.app  # the ASGI app behind the test client
        forwards = []
        real = state.running.router.forward
        state.running.router.forward = lambda inputs: forwards.append(1) or real(inputs)
        release = block_model_thread(state)
        body = json.dumps(post("gone")).encode()
        messages = [
            {"type": "http.request", "body": body, "more_body": False},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict:
            if len(messages) == 1:
                await asyncio.sleep(0.1)  # hang up a little after sending
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "POST",
            "path": "/route",
            "raw_path": b"/route",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 5000),
            "server": ("radar", 80),
            "scheme": "http",
            "root_path": "",
        }
        call = asyncio.create_task(app_call(scope, receive, send))
        await asyncio.wait_for(call, timeout=5)  # returns once the hang-up is seen
        release.set()
        after = await client.post("/route", json=post("after"))
        text = (await client.get("/metrics")).text
    assert sent[0]["status"] == 499  # only a log would see it: the caller is gone
    assert after.status_code == 200
    assert len(forwards) == 1  # the "after" post only: the abandoned one never ran
    assert sample(text, "radar_rejected_total", {"reason": "client_gone"}) == 1
