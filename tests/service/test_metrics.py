"""GET /metrics: Prometheus text that parses, with the series dashboards rely on."""

from prometheus_client.parser import text_string_to_metric_families

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
    assert "post_id" not in text
