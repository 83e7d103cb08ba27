"""GET /metrics: Prometheus text that parses, with the series dashboards rely on."""

import re
import time
from pathlib import Path
from typing import get_args

from prometheus_client.parser import text_string_to_metric_families

import app
from app.service.engine import FallbackReason
from app.service.errors import RejectReason, ServiceError
from app.service.metrics import DecisionLabel, Endpoint, PreparedAhead
from app.thresholds import RefusalReason
from tests.service.conftest import categories_of, model_version_of, post, write_thresholds
from tests.service.test_batching import sample


async def test_metrics_parse_and_count_decisions(running, tiny_store, thresholds_path) -> None:
    names = categories_of(tiny_store)
    # First category always dispatched, the others never: the counts are then exact.
    write_thresholds(
        thresholds_path, tiny_store, "v1", {names[0]: 0.0, names[1]: 1.0, names[2]: 1.0}
    )
    async with running() as (client, _):
        for i in range(3):
            await client.post("/route", json=post(f"m{i}"))
        text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "radar_posts",
        "radar_decisions",
        "radar_auto_pass",
        "radar_fallback",
        "radar_thresholds_reload_failures",
        "radar_rejected",
    ):
        assert families[name].type == "counter", name
    for name in (
        "radar_request_duration_seconds",
        "radar_batch_size",
        "radar_score",
        "radar_queue_wait_seconds",
        "radar_forward_duration_seconds",
    ):
        assert families[name].type == "histogram", name
    assert families["radar_queue_depth"].type == "gauge"
    assert sample(text, "radar_posts_total") == 3
    assert sample(text, "radar_auto_pass_total") == 0
    decisions = "radar_decisions_total"
    assert sample(text, decisions, {"category": names[0], "decision": "dispatch"}) == 3
    assert sample(text, decisions, {"category": names[1], "decision": "pass"}) == 3
    assert sample(text, decisions, {"category": names[1], "decision": "dispatch"}) == 0
    assert sample(text, "radar_score_count", {"category": names[2]}) == 3
    assert sample(text, "radar_model_info", {"model_version": model_version_of(tiny_store)}) == 1
    assert sample(text, "radar_request_duration_seconds_count", {"endpoint": "route"}) == 3
    per_post = "radar_request_duration_per_post_seconds"
    assert families[per_post].type == "histogram"
    assert sample(text, f"{per_post}_count", {"endpoint": "route"}) == 3
    assert "post_id" not in text


async def test_latency_per_post_counts_answered_requests_divided_by_their_posts(
    running,
) -> None:
    """RadarLatencyHigh reads it (a 64-post batch is fast per post, one slow post is slow)
    and RadarOverloaded counts answered requests with its _count."""
    per_post = "radar_request_duration_per_post_seconds"
    batch = {"posts": [post(f"b{i}") for i in range(4)]}
    async with running() as (client, _):
        started = time.monotonic()
        assert (await client.post("/route/batch", json=batch)).status_code == 200
        elapsed = time.monotonic() - started
        bad = {"posts": [{**post("x"), "images": [{"data": "aGVsbG8="}]}]}
        assert (await client.post("/route/batch", json=bad)).status_code == 422
        text = (await client.get("/metrics")).text
    batch_labels = {"endpoint": "route_batch"}
    assert sample(text, f"{per_post}_count", batch_labels) == 1  # one request; the 422 is none
    assert sample(text, f"{per_post}_count", {"endpoint": "route"}) == 0
    # Arrival to answer, within what the client waited, divided by the 4 posts.
    assert 0 < sample(text, f"{per_post}_sum", batch_labels) <= elapsed / 4
    assert sample(text, f"{per_post}_bucket", {**batch_labels, "le": "1.0"}) == 1
    assert sample(text, "radar_request_duration_seconds_count", batch_labels) == 2


def _label_values(text: str, name: str, label: str) -> set[str]:
    return {
        s.labels[label]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def test_every_bounded_series_exists_at_zero_from_the_first_scrape(
    running, tiny_store
) -> None:
    """`rate()` and `absent()` in alerts need each series before its first event."""
    async with running() as (client, _):
        text = (await client.get("/metrics")).text
        await client.post("/route", content=b"{not json", headers={"content-type": "json"})
        after = (await client.get("/metrics")).text
    assert 'radar_fallback_total{reason="model_error"} 0.0' in text
    for name, label, values in (
        ("radar_fallback_total", "reason", get_args(FallbackReason)),
        ("radar_rejected_total", "reason", get_args(RejectReason)),
        ("radar_thresholds_reload_failures_total", "reason", get_args(RefusalReason)),
        ("radar_request_duration_seconds_count", "endpoint", get_args(Endpoint)),
        ("radar_request_duration_per_post_seconds_count", "endpoint", get_args(Endpoint)),
    ):
        assert _label_values(text, name, label) == set(values), name
        for value in values:
            assert sample(text, name, {label: value}) == 0, (name, value)
    for category in categories_of(tiny_store):
        for decision in get_args(DecisionLabel):
            labels = {"category": category, "decision": decision}
            assert sample(text, "radar_decisions_total", labels) == 0
        assert sample(text, "radar_score_count", {"category": category}) == 0
    # An event moves its series and creates no new one.
    assert sample(after, "radar_rejected_total", {"reason": "invalid_request"}) == 1
    assert _label_values(after, "radar_rejected_total", "reason") == set(get_args(RejectReason))


def _service_errors(cls: type[ServiceError] = ServiceError) -> list[type[ServiceError]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_service_errors(sub))]


def test_label_literals_cover_every_value_the_code_uses() -> None:
    """The Literal types are the lists of label values: nothing counted outside them."""
    rejected = set(get_args(RejectReason))
    # Every 413/422 the handlers answer is counted, under its error's `rejection`.
    refusals = [e for e in _service_errors() if e.status_code in (413, 422)]
    assert all(e.rejection is not None for e in refusals), refusals
    assert {e.rejection for e in _service_errors()} - {None} <= rejected
    literals = {
        "rejected": rejected,
        "fallbacks": set(get_args(FallbackReason)),
        "reload_failures": set(get_args(RefusalReason)),
        "request_latency": set(get_args(Endpoint)),
        "prepared_ahead": set(get_args(PreparedAhead)),
    }
    sources = [path.read_text() for path in Path(app.__file__).parent.rglob("*.py")]
    used = [
        (metric, value)
        for text in sources
        for metric, value in re.findall(r"\.(\w+)\.labels\(\"(\w+)\"\)", text)
    ]
    used += [
        ("rejected", value)
        for text in sources
        for value in re.findall(r"\.count_rejection\(\"(\w+)\"\)", text)
    ]
    assert ("rejected", "body_timeout") in used  # the patterns find the call sites
    assert ("request_latency", "route") in used
    # Rejections are counted through `ServiceMetrics.count_rejection` only: one unit.
    counting = [
        path.name
        for path in Path(app.__file__).parent.rglob("*.py")
        if ".rejected.labels(" in path.read_text()
    ]
    assert counting == ["metrics.py"], counting
    for metric, value in used:
        assert value in literals[metric], (metric, value)


def test_every_prometheus_object_is_made_in_the_metrics_module() -> None:
    """One place to read what the service exports: the shadow, quality and decision-log
    series too (the log keeps plain counts, which `metrics` reads at each scrape)."""
    importing = sorted(
        str(path.relative_to(Path(app.__file__).parent))
        for path in Path(app.__file__).parent.rglob("*.py")
        if "prometheus_client" in path.read_text()
    )
    assert importing == ["service/metrics.py"], importing


async def test_each_batch_records_its_prepare_and_its_forward(running) -> None:
    async with running() as (client, _):
        before = (await client.get("/metrics")).text
        answered = await client.post("/route", json=post("timed"))
        after = (await client.get("/metrics")).text
    assert answered.status_code == 200
    for name in ("radar_prepare_duration_seconds_count", "radar_forward_duration_seconds_count"):
        assert sample(after, name) == sample(before, name) + 1, name
