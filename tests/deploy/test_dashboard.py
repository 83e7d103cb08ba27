"""The Grafana dashboard and its provisioning: valid PromQL over metrics the service exports."""

import asyncio
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.service.app import create_app
from app.service.settings import Settings
from tests.deploy.support import (
    REPO,
    dashboard,
    dashboard_queries,
    load_yaml,
    metric_names,
    panels,
    require_tool,
    substitute,
    undefined_in,
)

PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"

# What issues 6 and 7 ask the dashboard to show, as the series each view needs.
REQUIRED_SERIES = {
    "auto-pass rate overall": {"radar_auto_pass_total", "radar_posts_total"},
    "auto-pass and dispatch per category": {"radar_decisions_total"},
    "latency p50/p99": {"radar_request_duration_seconds_bucket"},
    "batch size": {"radar_batch_size_bucket"},
    "queue depth": {"radar_queue_depth"},
    "fallback rate": {"radar_fallback_total"},
    "reload-failure rate": {"radar_thresholds_reload_failures_total"},
    "active thresholds": {"radar_threshold", "radar_thresholds_info"},
    "model version": {"radar_model_info"},
    # issue 7: quality and shadow thresholds side by side
    "online recall, active and shadow": {"radar_online_recall", "radar_shadow_online_recall"},
    "auto-pass rate under the shadow": {"radar_shadow_auto_pass_total", "radar_shadow_posts_total"},
    "dispatch precision": {"radar_dispatch_precision"},
    "audits and verdicts": {"radar_audit_total", "radar_quality_verdicts"},
    "decision log health": {
        "radar_decision_log_write_failures_total",
        "radar_decision_log_dropped_total",
    },
}

SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def exported_series(exposition: str) -> dict[str, set[str] | None]:
    """Sample name -> label names, from /metrics text; None for a family with no sample yet."""
    exported: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(exposition):
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
            exported.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = exported.get(sample.name) or set()
            exported[sample.name] = labels | set(sample.labels)
    return exported


def write_thresholds(path: Path, version: str, tau: float | str) -> None:
    doc = {
        "version": version,
        "model_version": "tiny-qwen3vl-1",
        "categories": {name: {"tau": tau} for name in ("lqc", "rcs", "fe")},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


async def scrape_after_traffic(store: Path, thresholds: Path) -> str:
    """/metrics of the real app on the tiny model after posts, refusals and a bad reload,
    with a decision log and shadow thresholds (their series exist only then)."""
    write_thresholds(thresholds, "v1", 0.5)
    shadow = thresholds.with_name("shadow.yaml")
    write_thresholds(shadow, "candidate", 0.3)
    settings = Settings(
        model_dir=store,
        thresholds_path=thresholds,
        shadow_thresholds_path=shadow,
        decision_log_path=thresholds.with_name("decision_log.sqlite3"),
        device="cpu",
        thresholds_poll_s=0.05,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://radar") as client:
            await exercise(client, thresholds)
            return (await client.get("/metrics")).text


async def exercise(client: httpx.AsyncClient, thresholds: Path) -> None:
    post = {"post_id": "p1", "title": "hello", "ocr_text": "", "images": []}
    assert (await client.post("/route", json=post)).status_code == 200
    batch = {"posts": [post, {**post, "post_id": "p2"}]}
    assert (await client.post("/route/batch", json=batch)).status_code == 200
    bad_image = {**post, "images": [{"data": "aGVsbG8="}]}
    assert (await client.post("/route", json=bad_image)).status_code == 422
    write_thresholds(thresholds, "v2", "not a number")  # refused: the reload-failure series
    for _ in range(100):
        text = (await client.get("/metrics")).text
        # The series exists at 0 from the start: wait for the refusal to be counted.
        if 'radar_thresholds_reload_failures_total{reason="schema"} 1.0' in text:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the refused thresholds file never showed in /metrics")


@pytest.fixture(scope="module")
def exported(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    thresholds = tmp_path_factory.mktemp("dashboard") / "thresholds.yaml"
    return exported_series(asyncio.run(scrape_after_traffic(tiny_store, thresholds)))


def test_every_query_uses_only_exported_metrics_and_labels(exported: dict) -> None:
    problems = {
        where: missing
        for where, expr in dashboard_queries(dashboard())
        if (missing := undefined_in(expr, exported))
    }
    assert problems == {}


def test_the_check_catches_a_misspelled_metric_or_label(exported: dict) -> None:
    assert undefined_in("sum(rate(radar_post_total[5m]))", exported) == ["metric radar_post_total"]
    assert undefined_in('sum by (categry) (radar_decisions_total{decision="pass"})', exported) == [
        "label categry"
    ]
    assert undefined_in("sum by (instance) (radar_queue_depth)", exported) == []


def test_dashboard_covers_every_view_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries(dashboard())))
    missing = {view: series - used for view, series in REQUIRED_SERIES.items() if series - used}
    assert missing == {}
    exprs = [expr for _, expr in dashboard_queries(dashboard())]
    for quantile in ("0.5", "0.99"):
        assert any(
            f"histogram_quantile({quantile}," in e and "radar_request_duration" in e for e in exprs
        )
    assert any('decision="pass"' in e for e in exprs)
    assert any('decision="dispatch"' in e for e in exprs)


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = [
        {"record": f"radar:check_{index}", "expr": substitute(expr)}
        for index, (_, expr) in enumerate(dashboard_queries(dashboard()))
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_panels_have_unique_ids_and_the_datasource_variable() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_provisioned_datasource_is_the_dashboards_default() -> None:
    provisioned = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    (source,) = provisioned
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == source["uid"]
    assert source["type"] == variable["query"] == "prometheus"


def test_dashboard_provider_reads_the_directory_compose_mounts() -> None:
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "radar.yml")["providers"]
    grafana = load_yaml(REPO / "docker-compose.yml")["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/radar.json"
