"""The Prometheus alerting rules: valid, unit-tested, over metrics the service exports."""

import asyncio
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.service.metrics import ServiceMetrics
from app.service.settings import Settings
from app.thresholds import load_thresholds
from tests.deploy.support import (
    PROMETHEUS_CONFIG,
    REPO,
    load_yaml,
    require_tool,
    undefined_in,
)
from tests.deploy.test_dashboard import exported_series, scrape_after_traffic

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
CALIBRATED = REPO / "thresholds" / "proxy.yaml"  # the file the auto-pass band was set from

# Series Prometheus makes itself for every target (labels: job, instance).
PROMETHEUS_SERIES = {"up": set[str]()}
# Alerts on a state (0 or 1, or absence): their value says nothing, their labels say which.
STATE_ALERTS = {"RadarNotReady", "RadarTargetDown", "RadarMetricsAbsent"}


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded() -> dict[str, str]:
    return {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}


def expand(expr: str, definitions: dict[str, str]) -> str:
    """`expr` with every recording-rule name replaced by its definition, recursively."""
    alternatives = "|".join(map(re.escape, definitions))
    names = re.compile(rf"(?<![\w:])(?:{alternatives})(?![\w:])")
    for _ in range(10):
        expanded = names.sub(lambda match: f"({definitions[match.group()]})", expr)
        if expanded == expr:
            return expr
        expr = expanded
    raise AssertionError(f"recording rules nest too deep: {expr}")


def constant(record: str) -> float:
    """The value of a recording rule that is a constant, `vector(<number>)`."""
    match = re.fullmatch(r"\s*vector\(([\d.]+)\)\s*", recorded()[record])
    assert match, f"{record} is not a constant: {recorded()[record]}"
    return float(match.group(1))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    command = [require_tool("promtool"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.fixture(scope="module")
def exported(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Sample name -> label names of the real app's /metrics (the dashboard test's scrape)."""
    thresholds = tmp_path_factory.mktemp("alerts") / "thresholds.yaml"
    series = exported_series(asyncio.run(scrape_after_traffic(tiny_store, thresholds)))
    return {**series, **PROMETHEUS_SERIES}


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_uses_only_exported_metrics_and_labels(exported: dict) -> None:
    definitions = recorded()
    problems = {
        rule.get("alert") or rule["record"]: missing
        for rule in rules()
        if (missing := undefined_in(expand(rule["expr"], definitions), exported))
    }
    assert problems == {}


def test_the_check_catches_a_misspelled_metric_or_recording_rule(exported: dict) -> None:
    definitions = recorded()
    good = "radar:auto_pass_rate:ratio_rate15m > on() radar:auto_pass_rate:band_high"
    assert "radar_auto_pass_total" in expand(good, definitions)
    assert undefined_in(expand(good, definitions), exported) == []
    typo = "radar:auto_pass_rate:ratio_rate5m > 0"
    assert undefined_in(expand(typo, definitions), exported) == [
        "metric radar:auto_pass_rate:ratio_rate5m"
    ]
    assert undefined_in("increase(radar_fallbacks_total[5m]) > 0", exported) == [
        "metric radar_fallbacks_total"
    ]
    assert undefined_in("sum by (resaon) (radar_rejected_total) > 0", exported) == ["label resaon"]


def test_every_alert_has_a_duration_a_severity_and_templated_annotations() -> None:
    names = [alert["alert"] for alert in alerts()]
    assert len(names) == len(set(names))
    for alert in alerts():
        name, annotations = alert["alert"], alert["annotations"]
        assert alert.get("for"), name
        assert alert["labels"]["severity"] in {"page", "ticket"}, name
        assert annotations["runbook_url"] == "docs/deploy.md#alerts", name
        text = annotations["summary"] + annotations["description"]
        assert "{{" in text, name
        if name not in STATE_ALERTS:
            assert "$value" in text, name


def test_every_alert_fires_in_a_unit_test_and_stays_quiet_in_another() -> None:
    cases = [case for group in load_yaml(ALERTS_TEST)["tests"] for case in group["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {alert["alert"] for alert in alerts()}
    assert names - fired == set()
    assert names - quiet == set()
    assert load_yaml(ALERTS_TEST)["rule_files"] == [ALERTS.name]


def test_bands_and_targets_follow_the_active_file_not_constants() -> None:
    """The rules read the provenance the service exports; the service exports the active
    file's (here the shipped one): promoting a file moves the band and the targets."""
    definitions = recorded()
    assert "radar_expected_auto_pass_rate" in definitions["radar:auto_pass_rate:expected"]
    assert "radar_expected_pass_rate" in definitions["radar:category_pass_rate:expected"]
    for rule in rules():
        assert "vector(" not in rule["expr"], rule  # no constant band or target left
    (recall,) = [a for a in alerts() if a["alert"] == "RadarEstimatedRecallLow"]
    assert "radar_recall_target" in recall["expr"]
    file = load_yaml(CALIBRATED)
    metrics = ServiceMetrics()
    metrics.set_thresholds(
        load_thresholds(CALIBRATED, list(file["categories"]), file["model_version"])
    )
    text = metrics.render().decode()
    overall = file["calibration"]["expected_overall_auto_pass_rate"]
    assert f"radar_expected_auto_pass_rate {float(overall)!r}" in text
    for name, entry in file["categories"].items():
        assert f'radar_recall_target{{category="{name}"}} {float(entry["recall_target"])!r}' in text
        rate = float(entry["expected_auto_pass_rate"])
        assert f'radar_expected_pass_rate{{category="{name}"}} {rate!r}' in text


def test_rates_measured_with_other_taus_are_not_exported(tmp_path) -> None:
    """A hand-edited tau leaves the file's recorded rates describing other thresholds: the
    service exports NaN for that category and for the overall band, never a wrong band."""
    file = load_yaml(CALIBRATED)
    file["calibration"]["taus"] = {n: e["tau"] for n, e in file["categories"].items()}
    file["categories"]["spam"]["tau"] = 0.99
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(file, sort_keys=False))
    metrics = ServiceMetrics()
    metrics.set_thresholds(load_thresholds(edited, list(file["categories"]), file["model_version"]))
    text = metrics.render().decode()
    assert "radar_expected_auto_pass_rate NaN" in text
    assert 'radar_expected_pass_rate{category="spam"} NaN' in text
    hate = float(file["categories"]["hate"]["expected_auto_pass_rate"])
    assert f'radar_expected_pass_rate{{category="hate"}} {hate!r}' in text


def test_the_queue_threshold_is_80_percent_of_the_default_queue_size() -> None:
    size = Settings.model_fields["queue_size"].default
    (alert,) = [a for a in alerts() if a["alert"] == "RadarQueueNearFull"]
    assert alert["expr"].strip() == f"radar_queue_depth > {round(0.8 * size)}"
    assert str(size) in alert["annotations"]["summary"]


def test_prometheus_loads_the_rules_from_beside_its_config() -> None:
    assert load_yaml(PROMETHEUS_CONFIG)["rule_files"] == [ALERTS.name]
    assert ALERTS.parent == PROMETHEUS_CONFIG.parent
    prometheus = load_yaml(REPO / "docker-compose.yml")["services"]["prometheus"]
    mounts = dict(volume.split(":")[:2] for volume in prometheus["volumes"])
    config = Path(mounts[f"./{PROMETHEUS_CONFIG.relative_to(REPO)}"])
    assert mounts[f"./{ALERTS.relative_to(REPO)}"] == str(config.parent / ALERTS.name)


def test_the_deploy_doc_explains_every_alert() -> None:
    text = DEPLOY_DOC.read_text()
    assert re.search(r"^## Alerts$", text, re.MULTILINE)
    section = text.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    missing = [alert["alert"] for alert in alerts() if f"`{alert['alert']}`" not in section]
    assert missing == []
