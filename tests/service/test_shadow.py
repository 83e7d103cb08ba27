"""Shadow thresholds: decided beside the active ones, never acting; polled, validated and
withdrawn like a file ops manage."""

import asyncio
from pathlib import Path

import yaml

from tests.service.conftest import categories_of, post, write_thresholds
from tests.service.test_batching import sample


async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def shadow_version(client) -> str | None:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("radar_shadow_thresholds_info{"):
            return line.split('version="')[1].split('"')[0]
    return None


async def test_shadow_counts_its_decisions_and_never_changes_a_response(
    running, tiny_store: Path, thresholds_path: Path, tmp_path: Path
) -> None:
    categories = categories_of(tiny_store)
    first = categories[0]
    candidate = tmp_path / "candidate.yaml"
    # The candidate dispatches every post to the first category only; the active file
    # (tau 0.5 everywhere) decides what the responses say.
    taus = {name: (0.0 if name == first else 1.0) for name in categories}
    write_thresholds(candidate, tiny_store, "cand-1", taus)
    n = 12
    async with running(shadow_thresholds_path=candidate) as (client, _):
        results = [
            (await client.post("/route", json=post(f"s{i}", f"t {i}"))).json() for i in range(n)
        ]
        text = (await client.get("/metrics")).text
        ready = (await client.get("/readyz")).status_code
    assert ready == 200
    for r in results:
        assert r["dispatch"] == [c for c in categories if r["scores"][c] > 0.5]
        assert r["thresholds_version"] == "v1"
    assert sample(text, "radar_shadow_posts_total") == n
    assert sample(text, "radar_shadow_auto_pass_total") == 0
    assert (
        sample(text, "radar_shadow_decisions_total", {"category": first, "decision": "dispatch"})
        == n
    )
    for name in categories[1:]:
        labels = {"category": name, "decision": "pass"}
        assert sample(text, "radar_shadow_decisions_total", labels) == n
    assert sample(text, "radar_shadow_thresholds_info", {"version": "cand-1"}) == 1
    assert sample(text, "radar_shadow_threshold", {"category": first}) == 0.0
    # The active file's own counters describe what happened, not the shadow.
    dispatched = sum(first in r["dispatch"] for r in results)
    labels = {"category": first, "decision": "dispatch"}
    assert sample(text, "radar_decisions_total", labels) == dispatched


async def test_shadow_is_polled_refusals_keep_it_and_deleting_the_file_ends_it(
    running, tiny_store: Path, tmp_path: Path
) -> None:
    candidate = tmp_path / "candidate.yaml"
    write_thresholds(candidate, tiny_store, "cand-1", 0.3)
    async with running(shadow_thresholds_path=candidate) as (client, _):
        assert await shadow_version(client) == "cand-1"
        write_thresholds(candidate, tiny_store, "cand-2", 0.4)

        async def is_cand2() -> bool:
            return await shadow_version(client) == "cand-2"

        await wait_for(is_cand2)
        # A candidate for another model is refused; the previous candidate stays.
        doc = yaml.safe_load(candidate.read_text()) | {"version": "cand-3", "model_version": "x"}
        tmp = candidate.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(candidate)

        async def refused() -> bool:
            text = (await client.get("/metrics")).text
            labels = {"reason": "model_version"}
            return sample(text, "radar_shadow_reload_failures_total", labels) == 1

        await wait_for(refused)
        assert await shadow_version(client) == "cand-2"
        # Withdrawn: no shadow version, and routed posts no longer move the shadow counters.
        candidate.unlink()

        async def withdrawn() -> bool:
            return await shadow_version(client) is None

        await wait_for(withdrawn)
        before = sample((await client.get("/metrics")).text, "radar_shadow_posts_total")
        assert (await client.post("/route", json=post("after"))).status_code == 200
        text = (await client.get("/metrics")).text
        after = sample(text, "radar_shadow_posts_total")
    assert after == before
    assert "radar_shadow_threshold{" not in text  # no stale taus once the shadow ends


async def test_a_bad_shadow_file_at_start_up_does_not_stop_the_service(
    running, tmp_path: Path
) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text("version: [not, a, string\n")
    async with running(shadow_thresholds_path=candidate) as (client, _):
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.post("/route", json=post("p"))).status_code == 200
        text = (await client.get("/metrics")).text
    assert sample(text, "radar_shadow_reload_failures_total", {"reason": "yaml"}) == 1
    assert sample(text, "radar_shadow_posts_total") == 0
