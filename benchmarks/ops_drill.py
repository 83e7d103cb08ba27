"""The operations drill (issue 14, item 8): one category's recall drops in a live stream, the
recall alert fires, that category alone is recalibrated, shadowed and promoted, and the alert
resolves. Prints how long each step took.

Everything is real except the traffic and the verticals: `radar serve` on the tiny random
router, a real Prometheus scraping it with `deploy/prometheus/alerts.yml`, `radar calibrate`
(`--only`), `radar quality` and `radar thresholds promote` as an operator types them. The
test acts as the upload pipeline and the verticals: it streams seeded synthetic posts through
`/route/batch` and posts the verticals' verdicts to `/feedback` for what was dispatched and
what was audited, as `truth` decides:

- healthy: a post violates category c iff its score is in the top 30 % of c's scores (so the
  calibrated tau, written by `radar calibrate` on such posts, keeps recall ~0.94 >= 0.9);
- drifted (one category, `--category`): a new kind of violating post as well, half of the
  posts whose score lies between the 10th and 40th percentiles, all under tau: the router
  releases them and only the audits see them (recall ~0.63). Its pass rate is unchanged:
  no pass-rate alert can see this drift.

The steps: calibrate the active file on healthy data; stream healthy traffic until every
category's recall gauge has a value and no alert for `for` + a margin; drift; wait for
RadarEstimatedRecallLow to fire for the drifted category (and never for another); calibrate
that category alone on drifted data (`radar calibrate --only C --base active.yaml`), with an
`audit_boost` for it; shadow the candidate (`RADAR_SHADOW_THRESHOLDS_PATH`) and read its tau
and recall through Prometheus; `radar quality --thresholds candidate`; promote; wait for the
alert to resolve; stream on until the new version's gauge has a value of its own, above
target - 0.10, and the alert stays quiet for `for` + a margin.

    python benchmarks/ops_drill.py --preset ci          # ~2-3 min: the test's sizes
    python benchmarks/ops_drill.py --preset realistic   # the shipped `for: 30m`, ~45 min

`tests/ops/test_drill.py` runs the `ci` preset and asserts on the result.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.drill_stack import DrillError, Stack, stack  # noqa: E402

ALERT = "RadarEstimatedRecallLow"
WORDS = (
    "cheap", "pills", "cat", "video", "free", "money", "garden", "news", "vote", "win",
    "prize", "dog", "sale", "click", "now", "recipe", "travel", "crypto", "loan", "meme",
    "dance", "hate", "crowd",
)  # fmt: skip


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
    healthy_s: float  # healthy, once every recall gauge has a value: never pending this long
    hold_s: float  # after the fix's first recall value: never pending this long
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
    healthy_s=15.0,
    hold_s=15.0,
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


def draw(post_id: str, salt: str) -> float:
    """A uniform number fixed by the post (not the audit's draw: another salt)."""
    digest = hashlib.blake2b(f"{salt}\x00{post_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Truth:
    """What the verticals would say: top 30 % of scores violate; the drifted category also
    has a new kind of violating post among scores between its 10th and 40th percentiles."""

    high: dict[str, float]
    band: tuple[float, float]
    category: str

    @classmethod
    def from_scores(cls, categories: Iterable[str], scores: np.ndarray, category: str) -> "Truth":
        names = list(categories)
        high = {name: float(np.quantile(scores[:, k], 0.70)) for k, name in enumerate(names)}
        column = scores[:, names.index(category)]
        band = (float(np.quantile(column, 0.10)), float(np.quantile(column, 0.40)))
        return cls(high, band, category)

    def violating(self, post_id: str, category: str, score: float, drifted: bool) -> bool:
        if score >= self.high[category]:
            return True
        new_kind = self.band[0] <= score < self.band[1] and draw(post_id, "new-kind") < 0.5
        return drifted and category == self.category and new_kind


def post(prefix: str, i: int, rng: np.random.Generator) -> dict[str, Any]:
    words = rng.choice(WORDS, size=int(rng.integers(2, 9)))
    return {"post_id": f"{prefix}{i}", "title": " ".join(words) + f" {i}", "ocr_text": ""}


def scored_posts(
    path: Path, model_dir: Path, prefix: str, n: int, seed: int
) -> tuple[list[dict[str, Any]], np.ndarray, list[str]]:
    """`n` seeded posts written to `path` unlabelled and scored by the router (as `radar
    calibrate` will score them): the posts, their scores and the model's categories."""
    from app.evaluation.evaluate import score_data

    rng = np.random.default_rng(seed)
    posts = [post(prefix, i, rng) for i in range(n)]
    path.write_text("".join(json.dumps({**p, "images": [], "labels": {}}) + "\n" for p in posts))
    scored = score_data(model_dir, path)
    return posts, scored.scores, list(scored.categories)


def write_labelled(
    path: Path,
    posts: list[dict[str, Any]],
    scores: np.ndarray,
    names: list[str],
    label: Callable[[str, str, float], bool],
    categories: Iterable[str] | None = None,
) -> None:
    """The posts again, each category of `categories` (None: all) labelled by
    `label(post_id, category, score)`, the others -1 (not annotated)."""
    wanted = set(names if categories is None else categories)
    with path.open("w") as out:
        for row, p in zip(scores, posts, strict=True):
            labels = {
                name: int(label(p["post_id"], name, float(row[k]))) if name in wanted else -1
                for k, name in enumerate(names)
            }
            out.write(json.dumps({**p, "images": [], "labels": labels}) + "\n")


def radar(*args: str) -> str:
    """Run a `radar` command as an operator would; its output, or DrillError."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and CLI
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise DrillError(f"radar {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done.stdout


class Stream(threading.Thread):
    """The upload pipeline and the verticals: posts at a steady rate, verdicts for what was
    dispatched or audited."""

    def __init__(
        self, base_url: str, headers: dict[str, str], truth: Truth, config: DrillConfig
    ) -> None:
        super().__init__(name="drill-stream", daemon=True)
        self.base_url, self.headers, self.truth, self.config = base_url, headers, truth, config
        self.drifted = False
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.counts: Counter[str] = Counter()

    def run(self) -> None:
        try:
            self._stream()
        except BaseException as exc:  # reported by check(), in the drill's thread
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise DrillError(f"the stream stopped: {self.error!r}") from self.error
        if not self.is_alive() and not self.halt.is_set():
            raise DrillError("the stream stopped")

    def _stream(self) -> None:
        rng = np.random.default_rng(self.config.seed + 1)
        period = self.config.batch / self.config.posts_per_s
        next_at, i = time.monotonic(), 0
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30.0) as client:
            while not self.halt.is_set():
                posts = [post("s", i + j, rng) for j in range(self.config.batch)]
                i += len(posts)
                drifted = self.drifted
                answer = client.post("/route/batch", json={"posts": posts})
                answer.raise_for_status()
                verdicts = list(self._verdicts(answer.json()["results"], drifted))
                if verdicts:
                    client.post("/feedback", json={"verdicts": verdicts}).raise_for_status()
                self.counts["posts"] += len(posts)
                self.counts["verdicts"] += len(verdicts)
                next_at += period
                self.halt.wait(max(0.0, next_at - time.monotonic()))

    def _verdicts(self, results: list[dict[str, Any]], drifted: bool) -> Iterable[dict[str, Any]]:
        for result in results:
            for name in (*result["dispatch"], *result["audit"]):
                violating = self.truth.violating(
                    result["post_id"], name, result["scores"][name], drifted
                )
                if name in result["audit"]:
                    self.counts[f"audited {name}"] += 1
                    self.counts[f"audited misses {name}"] += violating
                yield {"post_id": result["post_id"], "category": name, "violating": violating}


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

    def categories(self, alertname: str) -> set[str]:
        return {category for name, category, _ in self.first if name == alertname}


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
        from benchmarks.drill_stack import PrometheusAPI

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
    alert_categories: set[str]
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
            f"{ALERT} seen for: {sorted(self.alert_categories)}; every alert seen, first:",
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
    c = config.category
    say("calibrating the active thresholds on healthy data")
    cal = workdir / "calibration.jsonl"
    posts, scores, names = scored_posts(cal, model_dir, "cal", config.n_calibration, config.seed)
    truth = Truth.from_scores(names, scores, c)
    write_labelled(cal, posts, scores, names, lambda p, n, x: truth.violating(p, n, x, False))
    active = workdir / "active.yaml"
    radar(
        "calibrate",
        "--model",
        str(model_dir),
        "--data",
        str(cal),
        "--recall",
        "0.9",
        "--version",
        "drill-1",
        "--out",
        str(active),
        "--no-progress",
    )
    tau_before = taus(active)
    env = {
        "RADAR_AUDIT_RATE": str(config.audit_rate),
        "RADAR_QUALITY_REFRESH_S": str(config.refresh_s),
        "RADAR_QUALITY_WINDOW_HOURS": str(config.window_hours),
        "RADAR_THRESHOLDS_POLL_S": str(config.poll_s),
    }
    overrides = {ALERT: config.recall_for} if config.recall_for else {}
    with stack(
        workdir, model_dir, prometheus_bin, env, overrides, config.scrape_s, config.eval_s
    ) as s:
        base_url = str(s.service.base_url).rstrip("/")
        stream = Stream(base_url, dict(s.service.headers), truth, config)
        watcher = Watcher(str(s.prometheus.client.base_url).rstrip("/"))
        stream.start()
        watcher.start()
        try:
            return _phases(config, s, stream, watcher, truth, model_dir, tau_before, started, say)
        finally:
            stream.halt.set()
            watcher.halt.set()
            stream.join(timeout=60)
            watcher.join(timeout=30)


def _phases(
    config: DrillConfig,
    s: Stack,
    stream: Stream,
    watcher: Watcher,
    truth: Truth,
    model_dir: Path,
    tau_before: dict[str, float],
    started: float,
    say: Callable[[str], None],
) -> DrillResult:
    c, prom = config.category, s.prometheus
    margin = 3 * (config.scrape_s + config.eval_s + config.refresh_s)

    def wait(what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
        def checked() -> Any:
            stream.check()
            return probe()

        return s.wait_for(what, checked, timeout_s, every_s=0.25)

    def gauge(name: str) -> dict[str, float]:
        return prom.by_category(name)

    def known(name: str, category: str) -> float | None:
        value = gauge(name).get(category)
        return None if value is None or value != value else value  # NaN: unknown

    say("healthy traffic until every category's recall gauge has a value")
    wait(
        "every category's recall gauge to have a value",
        lambda: all(known("radar_online_recall", n) is not None for n in tau_before) or None,
        30 * margin,
    )
    quiet_until = time.monotonic() + config.healthy_s
    while time.monotonic() < quiet_until:  # never even pending: it cannot fire
        stream.check()
        if watcher.log.categories(ALERT):
            raise DrillError(f"{ALERT} on healthy traffic: {gauge('radar_online_recall')}")
        time.sleep(0.5)
    healthy = gauge("radar_online_recall")
    say(f"healthy recall: {fmt(healthy)}; drift: {c} gets violating posts it scores low")

    t_drift = time.monotonic()
    stream.drifted = True
    wait(
        f"{ALERT} to fire for {c}",
        lambda: watcher.state(ALERT, c) == "firing" or None,
        config.fire_timeout_s,
    )
    t_fired = time.monotonic()
    fired = (known("radar_online_recall", c), known("radar_online_recall_upper", c))
    pending = watcher.log.first.get((ALERT, c, "pending"), t_fired)
    say(f"fired after {t_fired - t_drift:.1f} s: recall {fired[0]}, upper {fired[1]}")

    say(f"recalibrating {c} alone on drifted data (radar calibrate --only {c})")
    recal = workdir_file(s, "recalibration.jsonl")
    posts, scores, names = scored_posts(
        recal, model_dir, "recal", config.n_recalibration, config.seed + 2
    )
    write_labelled(recal, posts, scores, names, lambda p, n, x: truth.violating(p, n, x, True), [c])
    candidate = workdir_file(s, "candidate.yaml")
    radar(
        "calibrate",
        "--model",
        str(model_dir),
        "--data",
        str(recal),
        "--recall",
        "0.9",
        "--only",
        c,
        "--base",
        str(s.thresholds),
        "--version",
        "drill-2",
        "--out",
        str(candidate),
        "--no-progress",
    )
    if config.boost_rate is not None:
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        document = yaml.safe_load(candidate.read_text())
        document["audit_boost"] = {c: {"rate": config.boost_rate, "until": until.isoformat()}}
        candidate.write_text(yaml.safe_dump(document, sort_keys=False))
    tau_after = taus(candidate)

    say("shadowing the candidate")
    shadow_tmp = workdir_file(s, "shadow.yaml.tmp")
    shadow_tmp.write_text(candidate.read_text())
    shadow_tmp.replace(s.shadow)
    shadow_tau = wait(
        "the shadow tau in Prometheus",
        lambda: close(gauge("radar_shadow_threshold").get(c), tau_after[c]),
        30 * margin,
    )
    shadow_recall = wait(
        "the shadow's recall estimate",
        lambda: known("radar_shadow_online_recall", c),
        30 * margin,
    )
    active_recall = known("radar_online_recall", c) or float("nan")
    quality_output = radar("quality", "--log", str(s.decision_log), "--thresholds", str(candidate))
    say(quality_output.rstrip())

    say("promoting the candidate")
    radar(
        "thresholds",
        "promote",
        str(candidate),
        "--to",
        str(s.thresholds),
        "--model",
        str(model_dir),
    )
    t_promote = time.monotonic()
    wait(
        f"{ALERT} to resolve for {c}",
        lambda: watcher.state(ALERT, c) is None or None,
        config.resolve_timeout_s,
    )
    t_resolved = time.monotonic()
    recall_after = wait(
        "the new version's recall gauge to have a value",
        lambda: known("radar_online_recall", c),
        config.recover_timeout_s,
    )
    t_recovered = time.monotonic()
    say(f"the fix's recall {recall_after:.3f}; holding {config.hold_s:g} s")
    quiet_until = time.monotonic() + config.hold_s
    while time.monotonic() < quiet_until:
        stream.check()
        if watcher.state(ALERT, c) is not None:
            raise DrillError(f"{ALERT} for {c} again after the fix: {gauge('radar_online_recall')}")
        time.sleep(0.5)
    alerts_seen = [
        f"{name}{{{cat}}} {state}: drift {when - t_drift:+.0f} s, promote {when - t_promote:+.0f} s"
        for (name, cat, state), when in sorted(watcher.log.first.items(), key=lambda kv: kv[1])
    ]
    return DrillResult(
        config=config,
        category=c,
        recall_for_s=config.for_s,
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
        alert_categories=watcher.log.categories(ALERT),
        alerts_seen=alerts_seen,
        counts=dict(stream.counts),
        quality_output=quality_output,
        total_s=time.monotonic() - started,
    )


def workdir_file(s: Stack, name: str) -> Path:
    return s.workdir / name


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
