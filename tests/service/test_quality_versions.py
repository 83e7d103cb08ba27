"""Quality per thresholds version in the running service (issue 14, item 3): the quality
gauges read only the active version's decisions, so they restart at a promotion; and an
`audit_boost` in the thresholds file raises one category's audit rate until a given time,
each decision logging the rate it was audited at. The real app on the tiny model, the real
decision log (SQLite and PostgreSQL, tests/logs.py), `radar thresholds promote`."""

import asyncio
import datetime
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.cli import main
from app.service.audit import audit_draw
from app.thresholds import ThresholdsError, load_thresholds
from tests.logs import Location, log_settings, rows
from tests.service.conftest import categories_of, model_version_of, post, write_thresholds
from tests.service.test_batching import sample
from tests.service.test_thresholds_reload import wait_for_version

TOKEN = {"Authorization": "Bearer s3cret"}
NewLog = Callable[[], Location]


def thresholds_doc(store: Path, version: str, taus: dict[str, float], **extra: Any) -> str:
    doc = {
        "version": version,
        "model_version": model_version_of(store),
        "categories": {name: {"tau": tau} for name, tau in taus.items()},
        **extra,
    }
    return yaml.safe_dump(doc)


async def metrics_when(
    client: httpx.AsyncClient, check: Callable[[str], bool], timeout_s: float = 10.0
) -> str:
    """/metrics once `check` holds (the gauges refresh in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = (await client.get("/metrics")).text
        if check(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched:\n{text}")
        await asyncio.sleep(0.05)


async def test_quality_gauges_restart_at_a_promotion(
    running, tiny_store: Path, thresholds_path: Path, tmp_path: Path, new_log: NewLog
) -> None:
    categories = categories_of(tiny_store)
    first = categories[0]
    labels = {"category": first}
    audited = {"category": first, "kind": "audited"}
    dispatched = {"category": first, "kind": "dispatched"}
    # v1 releases everything and audits every release: 10 of 40 violating, all missed.
    write_thresholds(thresholds_path, tiny_store, "v1", 1.0)
    settings = {"admin_token": "s3cret", "audit_rate": 1.0, "quality_refresh_s": 0.05}
    async with running(**log_settings(new_log()), **settings) as (client, _):
        body = {"posts": [post(f"a{i}", f"t{i}") for i in range(40)]}
        assert (await client.post("/route/batch", json=body)).status_code == 200
        verdicts = [{"post_id": f"a{i}", "category": first, "violating": i < 10} for i in range(40)]
        await client.post("/feedback", json={"verdicts": verdicts}, headers=TOKEN)
        before = await metrics_when(
            client, lambda t: sample(t, "radar_quality_verdicts", audited) == 40
        )
        assert sample(before, "radar_online_recall", labels) == 0.0

        # The fix: v2 dispatches every post of the first category. Promoted as ops do.
        candidate = tmp_path / "v2.yaml"
        taus = dict.fromkeys(categories, 1.0) | {first: 0.0}
        candidate.write_text(thresholds_doc(tiny_store, "v2", taus))
        assert main(["thresholds", "promote", str(candidate), "--to", str(thresholds_path)]) == 0
        await wait_for_version(client, "v2")
        # At once, not after the next refresh: nothing is known of v2 yet.
        restarted = (await client.get("/metrics")).text
        for name in ("radar_online_recall", "radar_online_recall_upper"):
            assert math.isnan(sample(restarted, name, labels)), name
        assert sample(restarted, "radar_quality_verdicts", audited) == 0

        # v2's own verdicts: 30 dispatched, 15 violating. Its recall stays NaN (no audited
        # release under v2: misses cannot be seen), not v1's 0 % nor a mix of both versions.
        body = {"posts": [post(f"b{i}", f"u{i}") for i in range(30)]}
        assert (await client.post("/route/batch", json=body)).status_code == 200
        verdicts = [{"post_id": f"b{i}", "category": first, "violating": i < 15} for i in range(30)]
        await client.post("/feedback", json={"verdicts": verdicts}, headers=TOKEN)
        after = await metrics_when(
            client, lambda t: sample(t, "radar_quality_verdicts", dispatched) == 30
        )
    assert sample(after, "radar_quality_verdicts", audited) == 0  # v1's 40 are not read
    assert math.isnan(sample(after, "radar_online_recall", labels))
    assert sample(after, "radar_dispatch_precision", labels) == 0.5
    # The version the gauges describe, for a dashboard.
    assert sample(after, "radar_thresholds_info", {"version": "v2"}) == 1


async def test_an_audit_boost_raises_one_categorys_rate_until_it_expires(
    running, tiny_store: Path, thresholds_path: Path, new_log: NewLog
) -> None:
    categories = categories_of(tiny_store)
    boosted = categories[1]
    log = new_log()
    async with running(audit_rate=0.05, **log_settings(log)) as (client, state):
        until = time.time() + 4.0
        moment = datetime.datetime.fromtimestamp(until, datetime.UTC).isoformat()
        text = thresholds_doc(
            tiny_store,
            "v-boost",
            dict.fromkeys(categories, 1.0),  # everything released: every post can be audited
            audit_boost={boosted: {"rate": 1.0, "until": moment}},
        )
        tmp = thresholds_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(thresholds_path)
        await wait_for_version(client, "v-boost")
        body = {"posts": [post(f"b{i}", f"t{i}") for i in range(60)]}
        during = (await client.post("/route/batch", json=body)).json()["results"]
        await asyncio.sleep(max(until - time.time(), 0) + 0.1)
        body = {"posts": [post(f"c{i}", f"t{i}") for i in range(60)]}
        after = (await client.post("/route/batch", json=body)).json()["results"]
        state.running.decision_log.flush()
    # While boosted, every post is audited for the boosted category; the others keep the
    # service's rate; after `until`, the boosted category is back to it too.
    assert all(boosted in r["audit"] for r in during)
    for name in categories:
        share_after = sum(name in r["audit"] for r in after) / len(after)
        assert share_after < 0.2, (name, share_after)
        if name != boosted:
            assert sum(name in r["audit"] for r in during) / len(during) < 0.2
    # Every decision logs the rate it was audited at, and the draw at that rate decided it.
    logged = rows(
        log,
        "SELECT post_id, category, audited, audit_rate, decided_at FROM decisions "
        "WHERE post_id LIKE 'b%' OR post_id LIKE 'c%'",
    )
    assert len(logged) == 120 * len(categories)
    for post_id, name, was_audited, rate, decided_at in logged:
        expected = 1.0 if name == boosted and decided_at < until else 0.05
        assert rate == expected, (post_id, name, decided_at, until)
        assert bool(was_audited) == (audit_draw(post_id, name) < rate)
    assert {r[3] for r in logged if r[0].startswith("c")} == {0.05}


@pytest.mark.parametrize(
    ("boost", "problem"),
    [
        ({"rate": 0.1, "until": "2027-01-01T00:00:00"}, "timezone"),  # no zone: ambiguous
        ({"rate": 0.1, "until": 1_800_000_000}, "ISO-8601 time"),
        ({"rate": 0.0, "until": "2027-01-01T00:00:00Z"}, "greater than 0"),
        ({"rate": 1.5, "until": "2027-01-01T00:00:00Z"}, "less than or equal to 1"),
        ({"rate": 0.1}, "until"),
        ({"rate": 0.1, "until": "2027-01-01T00:00:00Z", "for_hours": 2}, "Extra inputs"),
    ],
)
def test_an_audit_boost_is_checked_like_the_rest_of_the_file(
    tiny_store: Path, tmp_path: Path, boost: dict[str, Any], problem: str
) -> None:
    categories = categories_of(tiny_store)
    path = tmp_path / "t.yaml"
    doc = thresholds_doc(tiny_store, "v", dict.fromkeys(categories, 0.5))
    path.write_text(doc + yaml.safe_dump({"audit_boost": {categories[0]: boost}}))
    with pytest.raises(ThresholdsError) as refused:
        load_thresholds(path, categories, model_version_of(tiny_store))
    assert refused.value.reason == "schema" and problem in refused.value.problem


def test_an_audit_boost_for_an_unknown_category_is_refused(
    tiny_store: Path, tmp_path: Path
) -> None:
    categories = categories_of(tiny_store)
    path = tmp_path / "t.yaml"
    boost = {"nope": {"rate": 0.1, "until": "2027-01-01T00:00:00Z"}}
    path.write_text(
        thresholds_doc(tiny_store, "v", dict.fromkeys(categories, 0.5), audit_boost=boost)
    )
    with pytest.raises(ThresholdsError) as refused:
        load_thresholds(path, categories, model_version_of(tiny_store))
    assert refused.value.reason == "categories" and "audit_boost" in refused.value.problem
    # Unquoted in YAML, a time is a datetime; quoted, a string: both are read.
    path.write_text(
        thresholds_doc(tiny_store, "v", dict.fromkeys(categories, 0.5))
        + f"audit_boost:\n  {categories[0]}: {{rate: 0.2, until: 2027-01-01T01:00:00+01:00}}\n"
    )
    active = load_thresholds(path, categories, model_version_of(tiny_store))
    assert active.audit_boost[categories[0]].rate == 0.2
    assert (
        active.audit_boost[categories[0]].until
        == datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC).timestamp()
    )
