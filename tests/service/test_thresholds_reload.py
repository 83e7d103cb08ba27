"""Hot reload of the thresholds file while the service runs; readiness follows validity."""

import asyncio

from tests.service.conftest import post, write_thresholds
from tests.service.test_batching import sample


async def wait_for_version(client, version: str, timeout: float = 5.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await client.post("/route", json=post("probe"))
        body = response.json()
        if response.status_code == 200 and body["thresholds_version"] == version:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"version {version} never became active; last {body}")
        await asyncio.sleep(0.05)


async def test_editing_the_yaml_changes_the_next_decision(running, tiny_store, thresholds_path):
    async with running() as (client, _):
        write_thresholds(thresholds_path, tiny_store, "all-dispatch", 0.0)
        dispatched = await wait_for_version(client, "all-dispatch")
        write_thresholds(thresholds_path, tiny_store, "all-pass", 1.0)
        passed = await wait_for_version(client, "all-pass")
    assert dispatched["auto_pass"] is False and len(dispatched["dispatch"]) == 3
    assert passed["auto_pass"] is True and passed["dispatch"] == []


async def test_an_invalid_yaml_is_refused_and_the_old_one_stays(
    running, tiny_store, thresholds_path
):
    async with running() as (client, _):
        thresholds_path.write_text("version: broken\ncategories: {lqc: {tau: 0.5}")
        await asyncio.sleep(0.3)  # several poll periods
        body = (await client.post("/route", json=post("p"))).json()
        ready = await client.get("/readyz")
        text = (await client.get("/metrics")).text
    assert body["thresholds_version"] == "v1"
    assert ready.status_code == 200
    assert sample(text, "radar_thresholds_reload_failures_total", {"reason": "yaml"}) == 1
    assert sample(text, "radar_thresholds_info", {"version": "v1"}) == 1


async def test_wrong_model_version_is_refused(running, tiny_store, thresholds_path):
    async with running(admin_token="s3cret") as (client, _):
        text = thresholds_path.read_text().replace("model_version:", "model_version: other #")
        thresholds_path.write_text(text)
        response = await client.post(
            "/admin/thresholds/reload", headers={"Authorization": "Bearer s3cret"}
        )
        body = (await client.post("/route", json=post("p"))).json()
    assert response.status_code == 422
    assert response.json()["reason"] == "model_version"
    assert response.json()["thresholds_version"] == "v1"
    assert body["thresholds_version"] == "v1"


async def test_admin_reload_applies_a_new_file_at_once(running, tiny_store, thresholds_path):
    async with running(admin_token="s3cret", thresholds_poll_s=3600) as (client, _):
        write_thresholds(thresholds_path, tiny_store, "v2", 1.0)
        response = await client.post(
            "/admin/thresholds/reload", headers={"Authorization": "Bearer s3cret"}
        )
        body = (await client.post("/route", json=post("p"))).json()
    assert response.status_code == 200
    assert response.json() == {
        "status": "changed",
        "thresholds_version": "v2",
        "reason": None,
        "message": "",
    }
    assert body["thresholds_version"] == "v2" and body["auto_pass"] is True


async def test_admin_needs_a_configured_token(running) -> None:
    async with running() as (client, _):
        disabled = await client.post("/admin/thresholds/reload")
    async with running(admin_token="s3cret") as (client, _):
        missing = await client.post("/admin/thresholds/reload")
        wrong = await client.post(
            "/admin/thresholds/reload", headers={"Authorization": "Bearer nope"}
        )
    assert disabled.status_code == 404
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert wrong.status_code == 403


async def test_not_ready_until_thresholds_are_valid(running, tiny_store, thresholds_path):
    thresholds_path.write_text("not: [valid")
    async with running() as (client, _):
        ready = await client.get("/readyz")
        routed = await client.post("/route", json=post("p"))
        alive = await client.get("/healthz")
        write_thresholds(thresholds_path, tiny_store, "fixed", 0.5)
        body = await wait_for_version(client, "fixed")
        ready_after = await client.get("/readyz")
    assert ready.status_code == 503 and "thresholds" in ready.json()["reason"]
    assert routed.status_code == 503 and "Retry-After" in routed.headers
    assert alive.status_code == 200
    assert body["thresholds_version"] == "fixed"
    assert ready_after.status_code == 200 and ready_after.json()["ready"] is True
