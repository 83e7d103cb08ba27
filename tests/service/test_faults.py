"""Faults fail safe (dispatch everywhere, never auto-pass) and loud (a metric, a log line).

(One injected model error: `test_route.py`; a bad YAML or another model's file refused by
the poller or the admin endpoint: `test_thresholds_reload.py`.)
"""

import asyncio
import shutil
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from app.model.errors import ModelStoreError
from app.service.app import create_app
from app.service.batcher import DynamicBatcher
from app.service.engine import RouterEngine
from tests.service.conftest import categories_of, post, serve, write_thresholds
from tests.service.test_batching import block_model_thread, sample

AUTH = {"Authorization": "Bearer s3cret"}


async def test_a_failed_batch_dispatches_every_post_everywhere(
    running, tiny_store, thresholds_path
):
    # tau = 1: every post would be auto-passed. A model failure must not inherit that.
    write_thresholds(thresholds_path, tiny_store, "pass-all", 1.0)
    async with running(max_batch_size=8, max_wait_ms=200) as (client, state):
        real_forward = state.running.router.forward
        state.running.router.forward = _raise_once(real_forward)
        release = block_model_thread(state)  # so the five posts gather into one batch
        pending = [asyncio.create_task(client.post("/route", json=post(f"f{i}"))) for i in range(5)]
        await asyncio.sleep(0.3)
        release.set()
        failed = [(await task).json() for task in pending]
        after = (await client.post("/route", json=post("next"))).json()
        text = (await client.get("/metrics")).text
    for body in failed:
        assert body["flags"] == ["fallback"] and body["auto_pass"] is False
        assert body["dispatch"] == categories_of(tiny_store) and body["scores"] == {}
    assert after["flags"] == [] and after["auto_pass"] is True
    assert sample(text, "radar_fallback_total", {"reason": "model_error"}) == 5
    assert sample(text, "radar_auto_pass_total") == 1  # only the post after the failure


async def test_non_finite_scores_fall_back_as_bad_output(running, tiny_store) -> None:
    async with running() as (client, state):
        real = state.running.router.predict_proba

        def nan_scores(posts):
            probs = real(posts).clone()  # an inference tensor is read-only outside the mode
            probs[:, 1] = float("nan")
            return probs

        state.running.router.predict_proba = nan_scores
        body = (await client.post("/route", json=post("n"))).json()
        text = (await client.get("/metrics")).text
    assert body["flags"] == ["fallback"] and body["dispatch"] == categories_of(tiny_store)
    assert sample(text, "radar_fallback_total", {"reason": "bad_output"}) == 1


def _raise_once(real):
    calls = {"n": 0}

    def forward(inputs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected device error")
        return real(inputs)

    return forward


async def test_broken_thresholds_files_are_refused_and_the_old_stay(
    running, tiny_store, thresholds_path: Path
) -> None:
    good = thresholds_path.read_text()
    last = categories_of(tiny_store)[-1]
    # yaml.safe_dump sorts keys: `categories` first, `version` last.
    broken = {
        "half-written": ({"yaml", "schema"}, good[: len(good) // 2]),
        "cut-in-a-category": ({"yaml", "schema"}, good.split(f"  {last}:")[0] + f"  {last}: {{ta"),
        "missing-category": ({"categories"}, _without_category(good, last)),
        "binary": ({"yaml"}, "\x00\x01\x02\ufffd\x7f%%%: ["),
        "empty": ({"schema"}, ""),
        "tau-out-of-range": ({"schema"}, good.replace("tau: 0.5", "tau: 1.5", 1)),
        "other-model": ({"model_version"}, good.replace("model_version: ", "model_version: x", 1)),
    }
    seen: Counter[str] = Counter()
    async with running(admin_token="s3cret", thresholds_poll_s=3600) as (client, _):
        for case, (reasons, text) in broken.items():
            thresholds_path.write_text(text)  # in place, not atomic: what ops must not do
            response = await client.post("/admin/thresholds/reload", headers=AUTH)
            assert response.status_code == 422, (case, response.text)
            assert response.json()["reason"] in reasons, (case, response.json())
            seen[response.json()["reason"]] += 1
            routed = (await client.post("/route", json=post(case))).json()
            assert routed["thresholds_version"] == "v1", case
        thresholds_path.unlink()
        missing = await client.post("/admin/thresholds/reload", headers=AUTH)
        ready = await client.get("/readyz")
        write_thresholds(thresholds_path, tiny_store, "v2", 0.5)  # write + rename
        fixed = await client.post("/admin/thresholds/reload", headers=AUTH)
        text = (await client.get("/metrics")).text
    assert missing.json()["reason"] == "unreadable"
    assert ready.status_code == 200  # the active thresholds stay valid: still ready
    assert fixed.json()["status"] == "changed" and fixed.json()["thresholds_version"] == "v2"
    seen["unreadable"] += 1
    for reason, count in seen.items():
        assert sample(text, "radar_thresholds_reload_failures_total", {"reason": reason}) == count


def _without_category(text: str, name: str) -> str:
    lines = text.splitlines(keepends=True)
    start = lines.index(f"  {name}:\n")
    return "".join(lines[:start] + lines[start + 2 :])  # the name and its `tau` line


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / "head.safetensors").write_bytes(b"\0" * 10), "head.safetensors"),
        (lambda d: (d / "adapter" / "adapter_config.json").write_text("{"), "adapter"),
        (lambda d: _truncate(d / "backbone" / "model.safetensors"), "model.safetensors"),
        (lambda d: shutil.rmtree(d / "backbone"), "backbone"),
    ],
)
async def test_a_corrupt_model_store_stops_start_up_naming_the_file(
    make_settings, tiny_store, tmp_path, caplog, damage, named: str
) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    damage(store)
    app = create_app(make_settings(model_dir=store))
    with pytest.raises(Exception) as caught:
        async with serve(app):
            pass
    assert named in str(caught.value) or named in caplog.text
    assert "cannot load the router from" in caplog.text
    assert isinstance(caught.value, ModelStoreError | OSError | ValueError | RuntimeError)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


async def test_not_ready_until_warm_up_succeeds(make_settings, monkeypatch) -> None:
    gate = threading.Event()
    real = RouterEngine.warm_up

    def slow_warm_up(self: RouterEngine) -> None:
        gate.wait(10)
        real(self)

    monkeypatch.setattr(RouterEngine, "warm_up", slow_warm_up)
    app = create_app(make_settings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://radar") as client:
        lifespan = app.router.lifespan_context(app)
        starting = asyncio.create_task(lifespan.__aenter__())
        await asyncio.sleep(0.5)
        during = await client.get("/readyz")
        routed = await client.post("/route", json=post("early"))
        gate.set()
        await starting
        after = await client.get("/readyz")
        await lifespan.__aexit__(None, None, None)
    assert during.status_code == 503 and during.json()["reason"] == "warming up"
    assert routed.status_code == 503 and routed.headers["Retry-After"] == "1"
    assert after.status_code == 200


def test_warm_up_failure_is_a_failed_start(make_settings, monkeypatch) -> None:
    def broken(self: RouterEngine) -> None:
        raise RuntimeError("warm-up forward failed")

    monkeypatch.setattr(RouterEngine, "warm_up", broken)
    batchers: list[DynamicBatcher] = []
    real_start = DynamicBatcher.start

    def start_and_keep(self: DynamicBatcher) -> None:
        batchers.append(self)
        real_start(self)

    monkeypatch.setattr(DynamicBatcher, "start", start_and_keep)
    app = create_app(make_settings(torch_threads=1))
    threads_before = torch.get_num_threads()

    async def start() -> None:
        async with serve(app):
            pass

    with pytest.raises(RuntimeError, match="warm-up forward failed"):
        asyncio.run(start())
    # The failed start was cleaned up: model thread stopped, torch's setting put back.
    assert app.state.radar.running is None  # never started: no request could reach it
    assert [b.alive for b in batchers] == [False]
    assert torch.get_num_threads() == threads_before
