"""A real scrape: `radar serve` and a real Prometheus server on loopback, queried over HTTP.

The service runs as the container runs it (`python -m app.cli serve`, settings from RADAR_*
variables) on the tiny model; Prometheus runs the shipped scrape job with a 1 s interval and
a loopback target. Thresholds are chosen so the auto-pass rates are known exactly:
20 posts under tau = 1.0 everywhere (p <= 1, so none is dispatched: all auto-pass), then
10 posts under tau(fe) = 0.0 (p > 0, so every one goes to fe): overall 20/30, per category
lqc 1, rcs 1, fe 20/30. Everything is bounded in time and stops by itself.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from benchmarks.loadgen import free_port, running
from tests.deploy.support import (
    PROMETHEUS_CONFIG,
    dashboard,
    dashboard_queries,
    load_yaml,
    require_tool,
    substitute,
)

pytestmark = pytest.mark.slow

CATEGORIES = ("lqc", "rcs", "fe")
# The window covers the whole test (< 60 s), so every counter's first sample is its 0 at
# start-up and rate()'s extrapolation is the same for numerator and denominator.
WINDOW = {"__rate_interval": "5m", "__interval": "5m", "__range": "5m"}
WAIT_TIMEOUT_S = 40.0
T = TypeVar("T")


def write_thresholds(path: Path, version: str, taus: dict[str, float]) -> None:
    doc = {
        "version": version,
        "model_version": "tiny-qwen3vl-1",
        "categories": {name: {"tau": tau} for name, tau in taus.items()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)  # atomic, as ops are told to do it


@dataclass
class Stack:
    service: httpx.Client
    prometheus: "Prometheus"
    thresholds: Path
    processes: list[tuple[subprocess.Popen[bytes], Path]]

    def wait_for(self, what: str, probe: Callable[[], T | None]) -> T:
        """Poll `probe` until it returns a value; fail early, with the log, if a process died."""
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while time.monotonic() < deadline:
            for process, log in self.processes:
                if process.poll() is not None:
                    pytest.fail(f"{log.name}: exited {process.returncode} ({what}):\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if (value := probe()) is not None:
                    return value
            time.sleep(0.2)
        logs = "\n".join(f"{log.name}:\n{tail(log)}" for _, log in self.processes)
        pytest.fail(f"timed out after {WAIT_TIMEOUT_S:.0f}s waiting for {what}\n{logs}")


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def scrape_config(service_port: int) -> dict[str, Any]:
    """The shipped config with a 1 s interval and the loopback service as the only target."""
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "radar"]
    for key in [k for k in job if k.endswith("_sd_configs")]:
        del job[key]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    return config


class Prometheus:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def by(self, label: str, expr: str) -> dict[str, float]:
        return {row["metric"][label]: float(row["value"][1]) for row in self.query(expr)}


def send_posts(client: httpx.Client, prefix: str, count: int) -> None:
    """Half one by one through /route, half in one /route/batch: both endpoints counted."""
    posts = [
        {"post_id": f"{prefix}{i}", "title": f"post {i}", "ocr_text": ""} for i in range(count)
    ]
    half = count // 2
    for post in posts[:half]:
        assert client.post("/route", json=post).status_code == 200
    response = client.post("/route/batch", json={"posts": posts[half:]})
    assert response.status_code == 200, response.text


def metrics_show(client: httpx.Client, needle: str) -> Callable[[], bool | None]:
    return lambda: (needle in client.get("/metrics").text) or None


@pytest.fixture
def stack(tiny_store: Path, tmp_path: Path) -> Iterator[Stack]:
    """The service and a Prometheus scraping it, both up and the first scrape done."""
    prometheus_bin = require_tool("prometheus")
    service_port, prometheus_port = free_port(), free_port()
    thresholds = tmp_path / "thresholds.yaml"
    write_thresholds(thresholds, "all-pass", dict.fromkeys(CATEGORIES, 1.0))
    # A shadow candidate that would dispatch every post: the dashboard's shadow views have data.
    shadow = tmp_path / "shadow.yaml"
    write_thresholds(shadow, "dispatch-all", dict.fromkeys(CATEGORIES, 0.0))
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(service_port)))
    # The shipped rules beside it, where `rule_files` looks: the real server loads them too.
    shutil.copy(PROMETHEUS_CONFIG.parent / "alerts.yml", tmp_path / "alerts.yml")
    env = {
        **os.environ,
        "RADAR_HOST": "127.0.0.1",
        "RADAR_PORT": str(service_port),
        "RADAR_MODEL_DIR": str(tiny_store),
        "RADAR_THRESHOLDS_PATH": str(thresholds),
        "RADAR_DEVICE": "cpu",
        "RADAR_THRESHOLDS_POLL_S": "0.2",
        "RADAR_LOG_LEVEL": "warning",
        "RADAR_SHADOW_THRESHOLDS_PATH": str(shadow),
        "RADAR_DECISION_LOG_PATH": str(tmp_path / "decision_log.sqlite3"),
    }
    service_log, prometheus_log = tmp_path / "service.log", tmp_path / "prometheus.log"
    server = [
        prometheus_bin,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
        "--log.level=warn",
    ]
    with (
        running([sys.executable, "-m", "app.cli", "serve"], service_log, env) as service,
        running(server, prometheus_log) as prometheus,
        httpx.Client(base_url=f"http://127.0.0.1:{service_port}", timeout=10.0) as client,
        httpx.Client(base_url=f"http://127.0.0.1:{prometheus_port}", timeout=10.0) as api,
    ):
        processes = [(service, service_log), (prometheus, prometheus_log)]
        stack = Stack(client, Prometheus(api), thresholds, processes)
        stack.wait_for("the service to be ready", lambda: client.get("/readyz").is_success or None)
        stack.wait_for(
            "Prometheus to scrape the service",
            lambda: stack.prometheus.scalar('max(up{job="radar"})') == 1.0 or None,
        )
        yield stack


def test_prometheus_computes_the_auto_pass_rates_of_real_traffic(stack: Stack) -> None:
    client, prometheus = stack.service, stack.prometheus
    send_posts(client, "a", 20)
    write_thresholds(stack.thresholds, "fe-all", {"lqc": 1.0, "rcs": 1.0, "fe": 0.0})
    stack.wait_for(
        "the reload", metrics_show(client, 'radar_thresholds_info{version="fe-all"} 1.0')
    )
    send_posts(client, "b", 10)
    stack.wait_for(
        "Prometheus to see all 30 posts",
        lambda: prometheus.scalar('sum(radar_posts_total{job="radar"})') == 30.0 or None,
    )
    # rate() needs two samples of a series: wait for a second scrape of the latency series.
    samples = "min(count_over_time(radar_request_duration_seconds_count[5m]))"
    stack.wait_for(
        "a second scrape of the latency series",
        lambda: (prometheus.scalar(samples) or 0) >= 2 or None,
    )

    queries = dict(dashboard_queries(dashboard()))
    overall = substitute(queries["panel 'Auto-pass rate' A"], WINDOW)
    per_category = substitute(queries["panel 'Auto-pass rate, overall and per category' B"], WINDOW)
    assert prometheus.scalar(overall) == pytest.approx(20 / 30, abs=1e-6)
    assert prometheus.by("category", per_category) == pytest.approx(
        {"lqc": 1.0, "rcs": 1.0, "fe": 20 / 30}, abs=1e-6
    )
    raw = prometheus.scalar("sum(radar_auto_pass_total) / sum(radar_posts_total)")
    assert raw == pytest.approx(20 / 30)
    # The shadow (tau 0 everywhere) would have dispatched every one of the same 30 posts.
    side_by_side = substitute(queries["panel 'Auto-pass rate: active vs shadow' B"], WINDOW)
    assert prometheus.scalar(side_by_side) == 0.0
    shadow_taus = substitute(queries["panel 'Shadow tau per category' A"], WINDOW)
    assert prometheus.by("category", shadow_taus) == dict.fromkeys(CATEGORIES, 0.0)
    assert prometheus.by("category", 'radar_threshold{job="radar"}') == {
        "lqc": 1.0,
        "rcs": 1.0,
        "fe": 0.0,
    }

    # Every dashboard query evaluates against the live series and has data, the failure views
    # too: no fallback, refusal or bad reload happened, but their series exist at 0 from the
    # start (app/service/metrics.py), so those panels show 0 rather than "no data".
    empty = {w for w, expr in queries.items() if not prometheus.query(substitute(expr, WINDOW))}
    assert empty == set()
    fallbacks = 'sum(radar_fallback_total{job="radar", reason="model_error"})'
    assert prometheus.scalar(fallbacks) == 0.0
    assert not prometheus.query('absent(radar_rejected_total{job="radar", reason="queue_full"})')
