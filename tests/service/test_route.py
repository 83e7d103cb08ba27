"""POST /route and /route/batch through the real app on the tiny Qwen3-VL router."""

import asyncio

import pytest

from tests.service.conftest import categories_of, model_version_of, post, write_thresholds


async def test_route_returns_scores_dispatch_and_versions(running, tiny_store) -> None:
    async with running() as (client, _):
        response = await client.post("/route", json=post("p1", "buy followers now", images=1))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["post_id"] == "p1"
    assert set(body["scores"]) == set(categories_of(tiny_store))
    assert all(0.0 <= p <= 1.0 for p in body["scores"].values())
    assert body["dispatch"] == [c for c, p in body["scores"].items() if p > 0.5]
    assert body["auto_pass"] == (body["dispatch"] == [])
    assert body["thresholds_version"] == "v1"
    assert body["model_version"] == model_version_of(tiny_store)
    assert body["flags"] == []


async def test_batch_answers_in_order_and_matches_single_posts(running) -> None:
    posts = [
        post("short", "hi"),
        post("long", "a much longer title " * 20, ocr="with ocr text " * 10, images=3),
        post("one-image", "picture", images=1),
    ]
    async with running() as (client, _):
        batch = await client.post("/route/batch", json={"posts": posts})
        singles = [await client.post("/route", json=p) for p in posts]
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r["post_id"] for r in results] == ["short", "long", "one-image"]
    # Batching must not change a post's scores (padding, image counts differ per row).
    for batched, single in zip(results, singles, strict=True):
        for category, score in single.json()["scores"].items():
            assert batched["scores"][category] == pytest.approx(score, abs=1e-5)


async def test_dispatch_follows_each_categorys_threshold(running, tiny_store, thresholds_path):
    names = categories_of(tiny_store)
    write_thresholds(
        thresholds_path, tiny_store, "mixed", {names[0]: 0.0, names[1]: 1.0, names[2]: 1.0}
    )
    async with running() as (client, _):
        body = (await client.post("/route", json=post("p"))).json()
    assert body["dispatch"] == [names[0]] and body["auto_pass"] is False


async def test_bad_image_is_422_naming_post_and_field(running) -> None:
    bad = post("p9")
    bad["images"] = [{"data": "bm90IGFuIGltYWdl"}]  # base64 of "not an image"
    async with running() as (client, _):
        response = await client.post("/route", json=bad)
        batch = await client.post("/route/batch", json={"posts": [post("ok"), bad]})
    assert response.status_code == 422
    assert response.json()["error"] == "bad_post"
    assert "p9" in response.json()["detail"] and "images[0].data" in response.json()["detail"]
    assert batch.status_code == 422 and "p9" in batch.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"post_id": "x", "images": [{"data": "!!!not base64"}]}, 422),
        ({"post_id": "x", "images": [{"url": "https://cdn.example/a.jpg"}]}, 422),
        ({"post_id": "x", "images": [{}]}, 422),
        ({"post_id": "", "title": "t"}, 422),
        ({"post_id": "x", "titel": "typo"}, 422),
        ({"post_id": 5}, 422),
        ({"post_id": "x", "images": [{"data": ""}] * 5}, 422),
    ],
)
async def test_invalid_requests_are_422(running, body, status) -> None:
    async with running() as (client, _):
        response = await client.post("/route", json=body)
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text


async def test_limits_on_batch_size_and_body(running) -> None:
    async with running(max_posts_per_request=2, max_body_bytes=4096) as (client, _):
        too_many = await client.post(
            "/route/batch", json={"posts": [post(f"p{i}") for i in range(3)]}
        )
        duplicate = await client.post("/route/batch", json={"posts": [post("a"), post("a")]})
        huge = await client.post("/route", json=post("big", "x" * 5000))
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_posts"
    assert duplicate.status_code == 422
    assert huge.status_code == 413 and huge.json()["error"] == "body_too_large"


async def test_model_failure_dispatches_to_every_category(running, tiny_store, monkeypatch):
    async with running() as (client, state):
        calls = {"n": 0}
        real_forward = state.running.router.forward

        def failing_once(inputs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected CUDA error")
            return real_forward(inputs)

        monkeypatch.setattr(state.running.router, "forward", failing_once)
        failed = (await client.post("/route", json=post("f1"))).json()
        normal = (await client.post("/route", json=post("f2"))).json()
        metrics = (await client.get("/metrics")).text
    assert failed["flags"] == ["fallback"]
    assert failed["dispatch"] == categories_of(tiny_store) and failed["auto_pass"] is False
    assert failed["scores"] == {}
    assert normal["flags"] == [] and set(normal["scores"]) == set(categories_of(tiny_store))
    assert 'radar_fallback_total{reason="model_error"} 1.0' in metrics


async def test_concurrent_requests_never_mix_answers(running) -> None:
    async with running(max_batch_size=4, max_wait_ms=20) as (client, _):
        responses = await asyncio.gather(
            *(client.post("/route", json=post(f"c{i}", f"title {i}")) for i in range(12))
        )
    assert [r.json()["post_id"] for r in responses] == [f"c{i}" for i in range(12)]
