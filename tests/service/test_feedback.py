"""The decision log and `POST /feedback`: every routed post logged per category, verdicts
committed before they are acknowledged and joined to their decisions, a retry replacing its
rows, old rows pruned, everything surviving a restart. The log's tests run on an SQLite file
and on a real PostgreSQL database (tests/logs.py)."""

import asyncio
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from app.feedback.log import DecisionLog, DecisionRecord
from app.service.metrics import ServiceMetrics
from tests.logs import Location, log_settings, rows
from tests.service.conftest import categories_of, post, write_thresholds
from tests.service.test_batching import sample

TOKEN = {"Authorization": "Bearer s3cret"}
NewLog = Callable[[], Location]


async def refreshed_metrics(client: httpx.AsyncClient, category: str) -> str:
    """/metrics once the quality gauges have counted `category`'s audited verdicts."""
    for _ in range(100):
        text = (await client.get("/metrics")).text
        if sample(text, "radar_quality_verdicts", {"category": category, "kind": "audited"}):
            return text
        await asyncio.sleep(0.05)
    raise AssertionError("quality gauges never refreshed")


async def test_decisions_are_logged_and_verdicts_are_committed_and_joined(
    running, tiny_store: Path, thresholds_path: Path, new_log: NewLog
) -> None:
    categories = categories_of(tiny_store)
    log_path = new_log()
    write_thresholds(thresholds_path, tiny_store, "v-half", 0.5)
    async with running(admin_token="s3cret", audit_rate=0.5, **log_settings(log_path)) as (
        client,
        _,
    ):
        results = [
            (await client.post("/route", json=post(f"f{i}", f"t{i}"))).json() for i in range(6)
        ]
        retried = (await client.post("/route", json=post("f0", "t0"))).json()
        verdicts = [
            {"post_id": "f1", "category": categories[0], "violating": True},
            {"post_id": "f2", "category": categories[1], "violating": False},
            {"post_id": "never-routed", "category": categories[0], "violating": True},
        ]
        answer = await client.post("/feedback", json={"verdicts": verdicts}, headers=TOKEN)
        # Acknowledged means committed: another connection sees the verdicts right now.
        stored = rows(log_path, "SELECT post_id, category, violating FROM feedback ORDER BY 1")
        text = (await client.get("/metrics")).text
    assert answer.status_code == 200
    assert answer.json() == {"accepted": 3, "joined": 2}
    assert stored == [
        ("f1", categories[0], 1),
        ("f2", categories[1], 0),
        ("never-routed", categories[0], 1),
    ]
    assert sample(text, "radar_feedback_verdicts_total", {"joined": "true"}) == 2
    assert sample(text, "radar_feedback_verdicts_total", {"joined": "false"}) == 1
    # After the app stopped (a restart): one row per post and category, the retry replaced
    # f0's rows, and each row says what the response said.
    logged = rows(
        log_path,
        "SELECT post_id, category, score, dispatched, audited, audit_rate, thresholds_version "
        "FROM decisions ORDER BY post_id, category",
    )
    assert len(logged) == 6 * len(categories)
    by_key = {(r[0], r[1]): r for r in logged}
    for result in [retried, *results[1:]]:
        for name in categories:
            _, _, score, dispatched, audited, rate, version = by_key[(result["post_id"], name)]
            assert score == result["scores"][name]
            assert dispatched == (name in result["dispatch"])
            assert audited == (name in result["audit"])
            assert rate == 0.5 and version == "v-half"


async def test_feedback_refuses_bad_requests(running, tiny_store: Path) -> None:
    async with running(admin_token="s3cret", max_verdicts_per_request=2) as (client, _):
        unknown = {"verdicts": [{"post_id": "p", "category": "nope", "violating": True}]}
        bad_category = await client.post("/feedback", json=unknown, headers=TOKEN)
        verdict = {"post_id": "p", "category": categories_of(tiny_store)[0], "violating": True}
        too_many = await client.post("/feedback", json={"verdicts": [verdict] * 3}, headers=TOKEN)
        no_token = await client.post("/feedback", json={"verdicts": [verdict]})
        empty = await client.post("/feedback", json={"verdicts": []}, headers=TOKEN)
    assert bad_category.status_code == 422
    assert "verdicts[0].category" in bad_category.json()["detail"]
    assert too_many.status_code == 413
    assert no_token.status_code == 401
    assert empty.status_code == 422


async def test_feedback_without_a_decision_log_is_404(running) -> None:
    async with running(admin_token="s3cret", decision_log_path=None) as (client, _):
        verdict = {"post_id": "p", "category": "x", "violating": True}
        answer = await client.post("/feedback", json={"verdicts": [verdict]}, headers=TOKEN)
    assert answer.status_code == 404
    assert answer.json()["error"] == "feedback_disabled"


def record(post_id: str, decided_at: float) -> DecisionRecord:
    return DecisionRecord(post_id, "c", 0.1, False, False, 0.01, "v", "m", decided_at)


def test_prune_drops_rows_past_the_retention_and_beyond_the_row_cap(new_log: NewLog) -> None:
    location = new_log()
    log = DecisionLog(location, retention_s=3600, max_rows=1000)
    log.start()
    now = time.time()
    try:
        log.record([record(f"old{i}", now - 7200) for i in range(5)])
        log.record([record(f"new{i}", now - i) for i in range(1200)])
        log.flush()
        log.prune(now)
    finally:
        log.stop()
    kept = rows(location, "SELECT post_id FROM decisions")
    assert len(kept) == 1000
    assert not any(post_id.startswith("old") for (post_id,) in kept)
    assert ("new0",) in kept and ("new1199",) not in kept  # the newest are kept


def test_a_full_buffer_drops_the_oldest_and_counts_them(new_log: NewLog) -> None:
    metrics = ServiceMetrics()
    location = new_log()
    log = DecisionLog(location, retention_s=3600, max_rows=1000, max_pending=10)
    metrics.track_decision_log(log.counts)
    log.record([record(f"p{i}", time.time()) for i in range(15)])  # not started: buffer only
    assert metrics.registry.get_sample_value("radar_decision_log_dropped_total") == 5
    log.start()
    log.stop()  # flushes what the buffer kept
    kept = rows(location, "SELECT post_id FROM decisions ORDER BY post_id")
    assert sorted(p for (p,) in kept) == sorted(f"p{i}" for i in range(5, 15))


async def test_online_quality_gauges_follow_the_verdicts(
    running, tiny_store: Path, thresholds_path: Path, new_log: NewLog
) -> None:
    categories = categories_of(tiny_store)
    first = categories[0]
    # tau 1: every category released; audit rate 1: every release audited (weight 1).
    write_thresholds(thresholds_path, tiny_store, "release-all", 1.0)
    settings = {"admin_token": "s3cret", "audit_rate": 1.0, "quality_refresh_s": 0.05}
    async with running(**log_settings(new_log()), **settings) as (client, _):
        text = (await client.get("/metrics")).text
        # NaN before any verdict: unknown, neither 0 nor 1.
        assert math.isnan(sample(text, "radar_online_recall", {"category": first}))
        assert math.isnan(sample(text, "radar_online_recall_upper", {"category": first}))
        body = {"posts": [post(f"q{i}", f"t{i}") for i in range(40)]}
        assert (await client.post("/route/batch", json=body)).status_code == 200
        verdicts = [{"post_id": f"q{i}", "category": first, "violating": i < 10} for i in range(40)]
        answer = await client.post("/feedback", json={"verdicts": verdicts}, headers=TOKEN)
        assert answer.json() == {"accepted": 40, "joined": 40}

        text = await refreshed_metrics(client, first)
    # The 10 violating posts were all released: the router caught none of them.
    assert sample(text, "radar_online_recall", {"category": first}) == 0.0
    # Every release audited (rate 1): a census, so the interval has no width.
    assert sample(text, "radar_online_recall_upper", {"category": first}) == 0.0
    assert sample(text, "radar_quality_verdicts", {"category": first, "kind": "audited"}) == 40
    # Nothing dispatched: no precision to report.
    assert math.isnan(sample(text, "radar_dispatch_precision", {"category": first}))


async def test_the_log_survives_a_restart_and_verdicts_join_decisions_made_before_it(
    running, tiny_store: Path, new_log: NewLog
) -> None:
    log_path = new_log()
    first = categories_of(tiny_store)[0]
    async with running(admin_token="s3cret", **log_settings(log_path)) as (client, _):
        body = {"posts": [post(f"r{i}", f"t{i}") for i in range(5)]}
        assert (await client.post("/route/batch", json=body)).status_code == 200
        early = [{"post_id": "r0", "category": first, "violating": True}]
        assert (await client.post("/feedback", json={"verdicts": early}, headers=TOKEN)).json() == {
            "accepted": 1,
            "joined": 1,
        }
    # A new process on the same log: the decisions and the acknowledged verdict are there.
    async with running(admin_token="s3cret", **log_settings(log_path)) as (client, _):
        late = [{"post_id": f"r{i}", "category": first, "violating": False} for i in (1, 2)]
        answer = await client.post("/feedback", json={"verdicts": late}, headers=TOKEN)
    assert answer.json() == {"accepted": 2, "joined": 2}
    assert rows(log_path, "SELECT post_id, violating FROM feedback ORDER BY post_id") == [
        ("r0", 1),
        ("r1", 0),
        ("r2", 0),
    ]


async def test_replicas_sharing_a_log_join_verdicts_whichever_replica_routed_the_post(
    running, tiny_store: Path, new_log: NewLog
) -> None:
    """Behind a load balancer a verdict reaches any replica: on a shared log it still joins.

    The answer's `joined` counts decisions already written, and the other replica writes its
    decisions up to a flush interval later; the verdict is stored all the same, and the
    estimates join at query time, so nothing is lost."""
    location = new_log()
    first = categories_of(tiny_store)[0]
    settings = {"admin_token": "s3cret", **log_settings(location)}
    async with running(**settings) as (a, _), running(**settings) as (b, _):
        for client, prefix in ((a, "a"), (b, "b")):
            body = {"posts": [post(f"{prefix}{i}", f"t{i}") for i in range(5)]}
            assert (await client.post("/route/batch", json=body)).status_code == 200
        # Each replica receives the verdicts on the posts the other one routed.
        answers = [
            await client.post(
                "/feedback",
                json={
                    "verdicts": [
                        {"post_id": f"{prefix}{i}", "category": first, "violating": i % 2 == 0}
                        for i in range(5)
                    ]
                },
                headers=TOKEN,
            )
            for client, prefix in ((a, "b"), (b, "a"))
        ]
    assert [answer.json()["accepted"] for answer in answers] == [5, 5]
    assert all(0 <= answer.json()["joined"] <= 5 for answer in answers)
    joined = rows(
        location,
        "SELECT d.post_id FROM decisions d JOIN feedback f "
        "ON f.post_id = d.post_id AND f.category = d.category ORDER BY d.post_id",
    )
    assert [p for (p,) in joined] == [f"{x}{i}" for x in "ab" for i in range(5)]


def test_replicas_upserting_the_same_posts_at_once_neither_deadlock_nor_lose_rows(
    new_log: NewLog,
) -> None:
    """Two writers replacing the same rows in one transaction each, concurrently: a retry
    routed to another replica. Locks taken in different orders would deadlock on PostgreSQL;
    each flush sorts its rows by key so they never are."""
    location = new_log()
    logs = [DecisionLog(location, retention_s=3600, max_rows=100_000) for _ in range(2)]
    for log in logs:
        log.start()
    failures: list[BaseException] = []
    try:
        for round_ in range(4):
            keys = [f"p{i}" for i in range(2000)]
            now = time.time()
            logs[0].record([record(k, now) for k in keys])
            logs[1].record([record(k, now + 1) for k in reversed(keys)])
            threads = [threading.Thread(target=flush_into, args=(log, failures)) for log in logs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not failures, f"round {round_}: {failures[0]!r}"
    finally:
        for log in logs:
            log.stop()
    assert rows(location, "SELECT COUNT(*) FROM decisions") == [(2000,)]


def flush_into(log: DecisionLog, failures: list[BaseException]) -> None:
    try:
        log.flush()
    except Exception as exc:  # handed to the test's thread
        failures.append(exc)


async def test_shadow_recall_is_estimated_from_the_same_verdicts(
    running, tiny_store: Path, thresholds_path: Path, tmp_path: Path, new_log: NewLog
) -> None:
    categories = categories_of(tiny_store)
    first = categories[0]
    # Active: release everything (tau 1), every release audited. Shadow: dispatch everything
    # (tau 0). The audits of the active decisions show what the shadow would have caught.
    write_thresholds(thresholds_path, tiny_store, "release-all", 1.0)
    candidate = tmp_path / "candidate.yaml"
    write_thresholds(candidate, tiny_store, "dispatch-all", 0.0)
    settings = {
        "admin_token": "s3cret",
        "audit_rate": 1.0,
        "quality_refresh_s": 0.05,
        "shadow_thresholds_path": candidate,
        **log_settings(new_log()),
    }
    async with running(**settings) as (client, _):
        text = (await client.get("/metrics")).text
        assert math.isnan(sample(text, "radar_shadow_online_recall", {"category": first}))
        body = {"posts": [post(f"s{i}", f"t{i}") for i in range(40)]}
        assert (await client.post("/route/batch", json=body)).status_code == 200
        verdicts = [{"post_id": f"s{i}", "category": first, "violating": i < 10} for i in range(40)]
        assert (await client.post("/feedback", json={"verdicts": verdicts}, headers=TOKEN)).json()[
            "joined"
        ] == 40
        text = await refreshed_metrics(client, first)
    assert sample(text, "radar_online_recall", {"category": first}) == 0.0
    assert sample(text, "radar_shadow_online_recall", {"category": first}) == 1.0
    # No verdicts on the other categories: unknown under both.
    assert math.isnan(sample(text, "radar_shadow_online_recall", {"category": categories[1]}))


async def test_of_two_verdicts_on_one_post_in_a_request_the_later_wins(
    running, tiny_store: Path, new_log: NewLog
) -> None:
    location = new_log()
    first = categories_of(tiny_store)[0]
    async with running(admin_token="s3cret", **log_settings(location)) as (client, _):
        assert (await client.post("/route", json=post("twice", "t"))).status_code == 200
        verdicts = [
            {"post_id": "twice", "category": first, "violating": True},
            {"post_id": "twice", "category": first, "violating": False},
        ]
        answer = await client.post("/feedback", json={"verdicts": verdicts}, headers=TOKEN)
    assert answer.json() == {"accepted": 2, "joined": 2}
    assert rows(location, "SELECT violating FROM feedback") == [(0,)]
