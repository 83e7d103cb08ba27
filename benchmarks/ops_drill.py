"""The operations drill (issue 14, item 8): one category's recall drops in a live stream, the
recall alert fires, that category alone is recalibrated, shadowed and promoted, and the alert
resolves. Prints how long each step took.

Everything is real except the traffic and the verticals: `radar serve` on the tiny random
router, a real Prometheus scraping it with `deploy/prometheus/alerts.yml`, `radar calibrate`
(`--only`), `radar quality` and `radar thresholds promote` as an operator types them. The
test acts as the upload pipeline and the verticals: it streams seeded synthetic posts through
`/route/batch` and posts the verticals' verdicts to `/feedback` for what was dispatched and
what was audited, as the truth decides (`benchmarks/drill_traffic.py`):

- healthy: a post violates category c iff its score is in the top 30 % of c's scores (so the
  calibrated tau, written by `radar calibrate` on such posts, keeps recall ~0.94 >= 0.9);
- drifted (one category, `--category`): a new kind of violating post as well, half of the
  posts whose score lies between the 10th and 40th percentiles, all under tau: the router
  releases them and only the audits see them (recall ~0.63). Its pass rate is unchanged:
  no pass-rate alert can see this drift.

The steps: calibrate the active file on healthy data; stream healthy traffic until every
category's recall gauge has a value, then `healthy_s` with the alert never firing;
drift; wait for
RadarEstimatedRecallLow to fire for the drifted category (and never for another); calibrate
that category alone on drifted data (`radar calibrate --only C --base active.yaml`), with an
`audit_boost` for it; shadow the candidate (`RADAR_SHADOW_THRESHOLDS_PATH`) and read its tau
and recall through Prometheus; `radar quality --thresholds candidate`; promote; wait for the
alert to resolve; stream on until the new version's gauge has a value of its own, above
target - 0.10, and the alert does not fire again for `hold_s`.

    python benchmarks/ops_drill.py --preset ci          # ~3 min: the test's sizes
    python benchmarks/ops_drill.py --preset realistic   # the shipped `for: 30m`, ~1 h

`tests/ops/test_drill.py` runs the `ci` preset and asserts on the result.
"""

import argparse
import dataclasses
import datetime
import math
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.drill_stack import DrillError, Stack, Watcher, stack  # noqa: E402
from benchmarks.drill_traffic import (  # noqa: E402
    Stream,
    StreamError,
    Truth,
    scored_posts,
    write_labelled,
)

ALERT = "RadarEstimatedRecallLow"


@dataclass(frozen=True)
class DrillConfig:
    """The drill's sizes and clocks (`CI` for the test, `REALISTIC` for the benchmark)."""

    posts_per_s: float  # the stream's rate, in batches of `batch` through /route/batch
    batch: int
    audit_rate: float  # RADAR_AUDIT_RATE
    boost_rate: float | None  # audit_boost of the recalibrated category in the candidate
    refresh_s: float  # RADAR_QUALITY_REFRESH_S
    window_hours: float  # RADAR_QUALITY_WINDOW_HOURS
    poll_s: float  # RADAR_THRESHOLDS_POLL_S
    scrape_s: float
    eval_s: float
    recall_for: str | None  # RadarEstimatedRecallLow's `for` in the drill's copy; None: shipped
    healthy_s: float  # healthy, once every recall gauge has a value: never firing this long
    hold_s: float  # after the fix's first recall value: never firing this long
    fire_timeout_s: float  # drift to firing, at most
    resolve_timeout_s: float  # promotion to resolved, at most
    recover_timeout_s: float  # promotion to the new version's first recall value, at most
    category: str = "fe"
    n_calibration: int = 600
    n_recalibration: int = 600
    seed: int = 0

    @property
    def for_s(self) -> float:
        return parse_duration(self.recall_for or shipped_for())


CI = DrillConfig(
    posts_per_s=20.0,
    batch=10,
    audit_rate=0.5,
    boost_rate=1.0,
    refresh_s=1.0,
    window_hours=0.02,  # 72 s
    poll_s=0.5,
    scrape_s=1.0,
    eval_s=1.0,
    recall_for="15s",
    healthy_s=20.0,
    hold_s=20.0,
    fire_timeout_s=150.0,
    resolve_timeout_s=30.0,
    recover_timeout_s=90.0,
)
# The shipped rules (`for: 30m`), scrape and evaluation intervals, the default window (24 h:
# here the whole run) and thresholds poll, a 1-minute refresh, traffic of a few posts a
# second with an audit rate high enough for the gauge to have a value within minutes (`radar
# quality plan` sizes it for real traffic). The hold after the fix covers the 15-minute
# windows of the pass-rate rules, which read the old tau's decisions for a while.
REALISTIC = DrillConfig(
    posts_per_s=4.0,
    batch=4,
    audit_rate=0.2,
    boost_rate=0.5,
    refresh_s=60.0,
    window_hours=24.0,
    poll_s=2.0,
    scrape_s=5.0,
    eval_s=15.0,
    recall_for=None,
    healthy_s=120.0,
    hold_s=900.0,
    fire_timeout_s=3600.0,
    resolve_timeout_s=600.0,
    recover_timeout_s=1800.0,
)
PRESETS = {"ci": CI, "realistic": REALISTIC}


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    raise ValueError(f"not a duration: {text!r}")


def shipped_for() -> str:
    from benchmarks.drill_stack import ALERTS

    document = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    (rule,) = [rule for rule in rules if rule.get("alert") == ALERT]
    return str(rule["for"])


def radar(*args: str) -> str:
    """Run a `radar` command as an operator would; its output, or DrillError."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and CLI
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise DrillError(f"radar {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done.stdout


@dataclass
class DrillResult:
    """What the drill saw; times in seconds."""

    config: DrillConfig
    category: str
    recall_for_s: float
    tau_before: dict[str, float]
    tau_after: dict[str, float]
    pending_after_drift_s: float
    fired_after_drift_s: float
    recall_when_fired: float
    upper_when_fired: float
    shadow_tau: float
    shadow_recall: float
    active_recall_before_promote: float
    resolved_after_promote_s: float
    recovered_after_promote_s: float
    recall_after_fix: float
    alert_categories: set[str]  # fired for
    pending_categories: set[str]  # pending for, at least
    alerts_seen: list[str]
    counts: dict[str, int]
    quality_output: str
    total_s: float

    def lines(self) -> list[str]:
        c, t = self.category, self.config
        return [
            f"drill: {c}'s recall drops; posts {t.posts_per_s:g}/s in batches of {t.batch}, "
            f"audit rate {t.audit_rate:g} (boost {t.boost_rate}), refresh {t.refresh_s:g} s, "
            f"window {t.window_hours:g} h, scrape {t.scrape_s:g} s, evaluation {t.eval_s:g} s, "
            f"{ALERT} for {self.recall_for_s:g} s",
            f"tau {c}: {self.tau_before[c]:.6f} -> {self.tau_after[c]:.6f} (others unchanged: "
            f"{all(self.tau_before[n] == self.tau_after[n] for n in self.tau_before if n != c)})",
            f"drift -> pending: {self.pending_after_drift_s:.1f} s; -> firing: "
            f"{self.fired_after_drift_s:.1f} s (recall {self.recall_when_fired:.3f}, upper "
            f"{self.upper_when_fired:.3f})",
            f"shadow: tau {self.shadow_tau:.6f}, estimated recall {self.shadow_recall:.3f} "
            f"(active {self.active_recall_before_promote:.3f})",
            f"promote -> resolved: {self.resolved_after_promote_s:.1f} s; -> the new version's "
            f"first recall value: {self.recovered_after_promote_s:.1f} s "
            f"({self.recall_after_fix:.3f})",
            f"{ALERT} fired for {sorted(self.alert_categories)}, pending for "
            f"{sorted(self.pending_categories)}; every alert seen, first:",
            *(f"  {line}" for line in self.alerts_seen),
            f"traffic: {self.counts}; total {self.total_s:.0f} s",
        ]


def run_drill(
    config: DrillConfig,
    model_dir: Path,
    prometheus_bin: str,
    workdir: Path,
    say: Callable[[str], None] = print,
) -> DrillResult:
    """The whole drill in `workdir`; DrillError if a step does not happen in its time."""
    started = time.monotonic()
    say("calibrating the active thresholds on healthy data")
    cal = workdir / "calibration.jsonl"
    posts, scores, names = scored_posts(cal, model_dir, "cal", config.n_calibration, config.seed)
    truth = Truth.from_scores(names, scores, config.category)
    write_labelled(cal, posts, scores, names, lambda p, n, x: truth.violating(p, n, x, False))
    active = workdir / "active.yaml"
    radar(
        "calibrate", "--model", str(model_dir), "--data", str(cal), "--recall", "0.9",
        "--version", "drill-1", "--out", str(active), "--no-progress",
    )  # fmt: skip
    env = {
        "RADAR_AUDIT_RATE": str(config.audit_rate),
        "RADAR_QUALITY_REFRESH_S": str(config.refresh_s),
        "RADAR_QUALITY_WINDOW_HOURS": str(config.window_hours),
        "RADAR_THRESHOLDS_POLL_S": str(config.poll_s),
    }
    overrides = {ALERT: config.recall_for} if config.recall_for else {}
    clocks = (config.scrape_s, config.eval_s)
    with stack(workdir, model_dir, prometheus_bin, env, overrides, *clocks) as running:
        drill = Drill(config, running, truth, model_dir, say)
        try:
            return drill.run(taus(active), started)
        finally:
            drill.stop()


class Drill:
    """The drill's steps on a running stack, with the stream and the alert watcher."""

    def __init__(
        self,
        config: DrillConfig,
        running: Stack,
        truth: Truth,
        model_dir: Path,
        say: Callable[[str], None],
    ) -> None:
        self.config, self.s, self.truth, self.model_dir, self.say = (
            config, running, truth, model_dir, say,
        )  # fmt: skip
        self.c = config.category
        base_url = str(running.service.base_url).rstrip("/")
        headers = dict(running.service.headers)
        rate = (config.posts_per_s, config.batch, config.seed)
        self.stream = Stream(base_url, headers, truth, *rate)
        self.watcher = Watcher(str(running.prometheus.client.base_url).rstrip("/"))
        # Long enough for a few scrapes, evaluations and refreshes.
        self.margin = 3 * (config.scrape_s + config.eval_s + config.refresh_s)
        self.stream.start()
        self.watcher.start()

    def stop(self) -> None:
        self.stream.halt.set()
        self.watcher.halt.set()
        self.stream.join(timeout=60)
        self.watcher.join(timeout=30)

    def run(self, tau_before: dict[str, float], started: float) -> DrillResult:
        self.healthy(tau_before)
        t_drift, pending, t_fired, fired = self.drift_until_fired()
        candidate = self.recalibrate()
        tau_after = taus(candidate)
        shadow_tau, shadow_recall, active_recall, quality = self.shadow(candidate, tau_after)
        t_promote, t_resolved, t_recovered, recall_after = self.promote(candidate)
        alerts_seen = [
            f"{name}{{{cat}}} {state}: drift {when - t_drift:+.0f} s, promote "
            f"{when - t_promote:+.0f} s"
            for (name, cat, state), when in sorted(self.watcher.log.first.items(), key=by_time)
        ]
        return DrillResult(
            config=self.config,
            category=self.c,
            recall_for_s=self.config.for_s,
            tau_before=tau_before,
            tau_after=tau_after,
            pending_after_drift_s=pending - t_drift,
            fired_after_drift_s=t_fired - t_drift,
            recall_when_fired=nan_if_none(fired[0]),
            upper_when_fired=nan_if_none(fired[1]),
            shadow_tau=shadow_tau,
            shadow_recall=shadow_recall,
            active_recall_before_promote=active_recall,
            resolved_after_promote_s=t_resolved - t_promote,
            recovered_after_promote_s=t_recovered - t_promote,
            recall_after_fix=recall_after,
            alert_categories=self.watcher.log.categories(ALERT),
            pending_categories=self.watcher.log.categories(ALERT, "pending"),
            alerts_seen=alerts_seen,
            counts=dict(self.stream.counts),
            quality_output=quality,
            total_s=time.monotonic() - started,
        )

    def healthy(self, categories: Iterable[str]) -> None:
        """Healthy traffic until every recall gauge has a value, then `healthy_s` (longer
        than the alert's `for`) in which the recall alert never fires."""
        self.say("healthy traffic until every category's recall gauge has a value")
        self.wait(
            "every category's recall gauge to have a value",
            lambda: (
                all(self.known("radar_online_recall", n) is not None for n in categories) or None
            ),
            30 * self.margin,
        )
        self.quiet(self.config.healthy_s, lambda: bool(self.watcher.log.categories(ALERT)))
        healthy = self.gauge("radar_online_recall")
        self.say(
            f"healthy recall: {fmt(healthy)}; drift: {self.c} gets violating posts it scores low"
        )

    def drift_until_fired(self) -> tuple[float, float, float, tuple[float | None, float | None]]:
        """Drift; when it began, the alert went pending and fired, and the gauges then."""
        t_drift = time.monotonic()
        self.stream.drifted = True
        self.wait(
            f"{ALERT} to fire for {self.c}",
            lambda: self.watcher.state(ALERT, self.c) == "firing" or None,
            self.config.fire_timeout_s,
        )
        t_fired = time.monotonic()
        fired = (
            self.known("radar_online_recall", self.c),
            self.known("radar_online_recall_upper", self.c),
        )
        pending = self.watcher.log.first.get((ALERT, self.c, "pending"), t_fired)
        self.say(f"fired after {t_fired - t_drift:.1f} s: recall {fired[0]}, upper {fired[1]}")
        return t_drift, pending, t_fired, fired

    def recalibrate(self) -> Path:
        """`radar calibrate --only C --base active.yaml` on fresh drifted data, plus an
        `audit_boost` for C (as docs/deploy.md advises after a promotion)."""
        c, config = self.c, self.config
        self.say(f"recalibrating {c} alone on drifted data (radar calibrate --only {c})")
        recal = self.s.workdir / "recalibration.jsonl"
        posts, scores, names = scored_posts(
            recal, self.model_dir, "recal", config.n_recalibration, config.seed + 2
        )
        truth = self.truth
        write_labelled(
            recal, posts, scores, names, lambda p, n, x: truth.violating(p, n, x, True), [c]
        )
        candidate = self.s.workdir / "candidate.yaml"
        radar(
            "calibrate", "--model", str(self.model_dir), "--data", str(recal), "--recall", "0.9",
            "--only", c, "--base", str(self.s.thresholds), "--version", "drill-2",
            "--out", str(candidate), "--no-progress",
        )  # fmt: skip
        if config.boost_rate is not None:
            until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
            document = yaml.safe_load(candidate.read_text())
            document["audit_boost"] = {c: {"rate": config.boost_rate, "until": until.isoformat()}}
            candidate.write_text(yaml.safe_dump(document, sort_keys=False))
        return candidate

    def shadow(
        self, candidate: Path, tau_after: dict[str, float]
    ) -> tuple[float, float, float, str]:
        """The candidate as the shadow: its tau and estimated recall through Prometheus, the
        active recall beside it, and `radar quality --thresholds` on the same log."""
        self.say("shadowing the candidate")
        tmp = self.s.workdir / "shadow.yaml.tmp"
        tmp.write_text(candidate.read_text())
        tmp.replace(self.s.shadow)  # atomic, as ops are told to do it
        shadow_tau = self.wait(
            "the shadow tau in Prometheus",
            lambda: close(self.gauge("radar_shadow_threshold").get(self.c), tau_after[self.c]),
            30 * self.margin,
        )
        shadow_recall = self.wait(
            "the shadow's recall estimate",
            lambda: self.known("radar_shadow_online_recall", self.c),
            30 * self.margin,
        )
        active_recall = nan_if_none(self.known("radar_online_recall", self.c))
        log, out = str(self.s.decision_log), radar
        quality = out("quality", "--log", log, "--thresholds", str(candidate))
        self.say(quality.rstrip())
        return shadow_tau, shadow_recall, active_recall, quality

    def promote(self, candidate: Path) -> tuple[float, float, float, float]:
        """`radar thresholds promote`; when it was done, the alert resolved and the new
        version's gauge had a value (and that value), then `hold_s` without firing."""
        self.say("promoting the candidate")
        active, model = str(self.s.thresholds), str(self.model_dir)
        radar("thresholds", "promote", str(candidate), "--to", active, "--model", model)
        t_promote = time.monotonic()
        self.wait(
            f"{ALERT} to resolve for {self.c}",
            lambda: self.watcher.state(ALERT, self.c) is None or None,
            self.config.resolve_timeout_s,
        )
        t_resolved = time.monotonic()
        recall_after = self.wait(
            "the new version's recall gauge to have a value",
            lambda: self.known("radar_online_recall", self.c),
            self.config.recover_timeout_s,
        )
        t_recovered = time.monotonic()
        self.say(f"the fix's recall {recall_after:.3f}; holding {self.config.hold_s:g} s")
        self.quiet(self.config.hold_s, lambda: self.watcher.state(ALERT, self.c) == "firing")
        return t_promote, t_resolved, t_recovered, recall_after

    def quiet(self, seconds: float, alerting: Callable[[], bool]) -> None:
        """Stream on for `seconds`; DrillError as soon as `alerting()`."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.check_stream()
            if alerting():
                raise DrillError(f"{ALERT} when it should not: {self.gauge('radar_online_recall')}")
            time.sleep(0.5)

    def check_stream(self) -> None:
        try:
            self.stream.check()
        except StreamError as exc:
            raise DrillError(str(exc)) from exc

    def wait(self, what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
        def checked() -> Any:
            self.check_stream()
            return probe()

        return self.s.wait_for(what, checked, timeout_s, every_s=0.25)

    def gauge(self, name: str) -> dict[str, float]:
        return self.s.prometheus.by_category(name)

    def known(self, name: str, category: str) -> float | None:
        value = self.gauge(name).get(category)
        return None if value is None or math.isnan(value) else value  # NaN: unknown


def by_time(item: tuple[tuple[str, str, str], float]) -> float:
    return item[1]


def taus(path: Path) -> dict[str, float]:
    document = yaml.safe_load(path.read_text())
    return {name: float(entry["tau"]) for name, entry in document["categories"].items()}


def close(value: float | None, expected: float) -> float | None:
    return value if value is not None and abs(value - expected) < 1e-9 else None


def nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in sorted(values.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="realistic")
    parser.add_argument("--category", help="the category whose recall drops (default: fe)")
    parser.add_argument("--model-dir", type=Path, help="model store (default: a new tiny one)")
    parser.add_argument("--prometheus", default="prometheus", help="the prometheus binary")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # SIGTERM ends the drill through its `finally`s: the service and Prometheus stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = dataclasses.replace(PRESETS[args.preset], seed=args.seed)
    if args.category:
        config = dataclasses.replace(config, category=args.category)
    with tempfile.TemporaryDirectory(prefix="radar-drill-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model_dir = args.model_dir
        if model_dir is None:
            from app.model.tiny import make_tiny_router

            model_dir = make_tiny_router(workdir / "tiny")

        def say(line: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

        result = run_drill(config, model_dir, args.prometheus, workdir, say)
        print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
