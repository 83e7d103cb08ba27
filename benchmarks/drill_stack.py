"""The operations drill's stack: a real `radar serve` and a real Prometheus on loopback.

Used by `benchmarks/ops_drill.py` (the drill itself) and `tests/ops/test_drill.py` (its
CI-sized run). Prometheus runs the shipped scrape job with the service as its only static
target and the shipped `deploy/prometheus/alerts.yml`, in which only the `for` of named alerts
may be shortened (`drill_rules`): every expression stays the shipped one.
"""

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from benchmarks.loadgen import free_port, running

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ADMIN_TOKEN = "drill-admin-token"
T = TypeVar("T")


class DrillError(RuntimeError):
    """A drill step did not happen in its time, or a process of the stack died."""


def drill_rules(for_overrides: Mapping[str, str]) -> tuple[str, dict[str, tuple[str, str]]]:
    """The shipped alerts.yml with the `for` of each alert in `for_overrides` replaced.

    Returns the new YAML and, per alert, its (shipped, drill) `for`. Raises DrillError for an
    alert that alerts.yml does not have. Expressions, labels and annotations are untouched
    (a YAML round trip keeps their values, which is what Prometheus reads)."""
    shipped = yaml.safe_load(ALERTS.read_text())
    document = yaml.safe_load(ALERTS.read_text())
    changed: dict[str, tuple[str, str]] = {}
    for group in document["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert")
            if name in for_overrides:
                changed[name] = (rule.get("for", "0s"), for_overrides[name])
                rule["for"] = for_overrides[name]
    missing = sorted(set(for_overrides) - set(changed))
    if missing:
        raise DrillError(f"alerts.yml has no alert {missing}")
    for old, new in zip(_rules(shipped), _rules(document), strict=True):
        if old.get("expr") != new.get("expr"):  # never: only `for` was written
            raise DrillError(f"expression of {old.get('alert') or old.get('record')} changed")
    return yaml.safe_dump(document, sort_keys=False), changed


def _rules(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in document["groups"] for rule in group["rules"]]


def prometheus_config(service_port: int, scrape_s: float, eval_s: float) -> dict[str, Any]:
    """The shipped config with the loopback service as the only target of job `radar`."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(
        scrape_interval=f"{scrape_s:g}s",
        scrape_timeout=f"{min(scrape_s, 10):g}s",
        evaluation_interval=f"{eval_s:g}s",
    )
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "radar"]
    for key in [k for k in job if k.endswith("_sd_configs")]:
        del job[key]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    return config


def tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class PrometheusAPI:
    """The few calls of Prometheus' HTTP API the drill makes."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.client.get("/api/v1/query", params={"query": expr}).json()
        if body.get("status") != "success":
            raise DrillError(f"query {expr!r}: {body}")
        return list(body["data"]["result"])

    def by_category(self, expr: str) -> dict[str, float]:
        return {row["metric"]["category"]: float(row["value"][1]) for row in self.query(expr)}

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing now (a resolved alert is no longer listed)."""
        body = self.client.get("/api/v1/alerts").json()
        if body.get("status") != "success":
            raise DrillError(f"/api/v1/alerts: {body}")
        return list(body["data"]["alerts"])

    def rule_names(self) -> set[str]:
        body = self.client.get("/api/v1/rules").json()
        groups = body.get("data", {}).get("groups", [])
        return {rule["name"] for group in groups for rule in group["rules"]}


@dataclass
class AlertLog:
    """Every state each (alert, category) was seen in, and when (monotonic seconds)."""

    first: dict[tuple[str, str, str], float] = field(default_factory=dict)
    last: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def see(self, alerts: list[dict[str, Any]], now: float) -> None:
        for alert in alerts:
            key = (
                alert["labels"]["alertname"],
                alert["labels"].get("category", ""),
                alert["state"],
            )
            self.first.setdefault(key, now)
            self.last[key] = now

    def categories(self, alertname: str, state: str = "firing") -> set[str]:
        """The categories `alertname` was seen in `state` for."""
        return {cat for name, cat, seen in self.first if name == alertname and seen == state}


class Watcher(threading.Thread):
    """Polls Prometheus' /api/v1/alerts every half second into an AlertLog."""

    def __init__(self, base_url: str) -> None:
        super().__init__(name="drill-alerts", daemon=True)
        self.base_url = base_url
        self.log = AlertLog()
        self.now: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10.0) as client:
            api = PrometheusAPI(client)
            while not self.halt.is_set():
                try:
                    alerts = api.alerts()
                except (httpx.HTTPError, DrillError):
                    alerts = None
                if alerts is not None:
                    with self.lock:
                        self.log.see(alerts, time.monotonic())
                        self.now = alerts
                self.halt.wait(0.5)

    def state(self, alertname: str, category: str) -> str | None:
        """'pending', 'firing', or None (inactive) at the last poll."""
        with self.lock:
            for alert in self.now:
                labels = alert["labels"]
                if labels["alertname"] == alertname and labels.get("category") == category:
                    return str(alert["state"])
        return None


@dataclass
class Stack:
    """The running service and Prometheus, with clients for both."""

    service: httpx.Client
    prometheus: PrometheusAPI
    workdir: Path
    thresholds: Path
    shadow: Path
    decision_log: Path
    processes: list[tuple["subprocess.Popen[bytes]", Path]] = field(default_factory=list)

    def check_alive(self) -> None:
        for process, log in self.processes:
            if process.poll() is not None:
                raise DrillError(f"{log.name}: exited {process.returncode}:\n{tail(log)}")

    def wait_for(
        self, what: str, probe: Callable[[], T | None], timeout_s: float, every_s: float = 0.25
    ) -> T:
        """Poll `probe` until it returns a value; DrillError (with the logs) after
        `timeout_s`, or at once if a process died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if (value := probe()) is not None:
                    return value
            time.sleep(every_s)
        logs = "\n".join(f"{log.name}:\n{tail(log)}" for _, log in self.processes)
        raise DrillError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")


@contextlib.contextmanager
def stack(
    workdir: Path,
    model_dir: Path,
    prometheus_bin: str,
    service_env: Mapping[str, str],
    for_overrides: Mapping[str, str],
    scrape_s: float,
    eval_s: float,
    start_timeout_s: float = 120.0,
) -> Iterator[Stack]:
    """The service (`python -m app.cli serve`, as the container runs it) on the thresholds
    file `workdir/active.yaml`, which must exist, and Prometheus scraping it with the drill's
    rules; both ready, the rules loaded and the first scrape done."""
    service_port, prometheus_port = free_port(), free_port()
    thresholds, shadow = workdir / "active.yaml", workdir / "shadow.yaml"
    decision_log = workdir / "decision_log.sqlite3"
    rules, _ = drill_rules(for_overrides)
    (workdir / "alerts.yml").write_text(rules)  # where the shipped `rule_files` looks
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(service_port, scrape_s, eval_s)))
    env = {
        **os.environ,
        "RADAR_HOST": "127.0.0.1",
        "RADAR_PORT": str(service_port),
        "RADAR_MODEL_DIR": str(model_dir),
        "RADAR_THRESHOLDS_PATH": str(thresholds),
        "RADAR_SHADOW_THRESHOLDS_PATH": str(shadow),  # absent until the candidate is shadowed
        "RADAR_DECISION_LOG_PATH": str(decision_log),
        "RADAR_ADMIN_TOKEN": ADMIN_TOKEN,
        "RADAR_DEVICE": "cpu",
        "RADAR_LOG_LEVEL": "warning",
        **service_env,
    }
    server = [
        prometheus_bin,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
        "--log.level=warn",
    ]
    service_log, prometheus_log = workdir / "service.log", workdir / "prometheus.log"
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with (
        running([sys.executable, "-m", "app.cli", "serve"], service_log, env) as service,
        running(server, prometheus_log) as prometheus,
        httpx.Client(
            base_url=f"http://127.0.0.1:{service_port}", timeout=30.0, headers=headers
        ) as client,
        httpx.Client(base_url=f"http://127.0.0.1:{prometheus_port}", timeout=10.0) as api,
    ):
        running_stack = Stack(
            client,
            PrometheusAPI(api),
            workdir,
            thresholds,
            shadow,
            decision_log,
            [(service, service_log), (prometheus, prometheus_log)],
        )
        prom = running_stack.prometheus
        wait = running_stack.wait_for
        wait(
            "the service to be ready",
            lambda: client.get("/readyz").is_success or None,
            start_timeout_s,
        )
        wait(
            "Prometheus to load the rules",
            lambda: "RadarEstimatedRecallLow" in prom.rule_names() or None,
            start_timeout_s,
        )
        wait(
            "Prometheus to scrape the service",
            lambda: bool(prom.query('up{job="radar"} == 1')) or None,
            start_timeout_s,
        )
        yield running_stack
