"""Every Prometheus object of the service, in one registry per app, updated at a few hooks:
the routing series (`ServiceMetrics`), the shadow thresholds' (`ShadowSeries`), the online
quality gauges (`QualitySeries`) and the decision log's counters, which the log keeps as
plain counts (`app.feedback.log.LogCounts`) and this module reads at each scrape.

Histograms, not summaries, so replicas aggregate; labels are bounded (categories, decisions,
reasons, endpoints; never post ids). Every bounded label value is created at 0 when the
metrics are built (categories once the model is loaded), so `rate()` and `absent()` see each
series from the first scrape on, not only after its first event. The `Literal` types below
(and `FallbackReason`, `RefusalReason` where those reasons arise) are the lists used.

Auto-pass rate, overall and per category (PromQL):
    sum(rate(radar_auto_pass_total[5m])) / sum(rate(radar_posts_total[5m]))
    sum by (category) (rate(radar_decisions_total{decision="pass"}[5m]))
      / sum by (category) (rate(radar_decisions_total[5m]))
"""

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from app.feedback.log import LogCounts
from app.service.engine import FallbackReason
from app.service.errors import RejectReason
from app.thresholds import ActiveThresholds, RefusalReason

# `*_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()

Endpoint = Literal["route", "route_batch"]
DecisionLabel = Literal["dispatch", "pass"]

# Why a decision the model computed never reached its caller (logged with this reason in the
# decision log's `unanswered` column): its deadline passed (504), the caller hung up or gave
# up (499, cancelled), or the request failed some other way after its posts were queued.
UnansweredReason = Literal["deadline", "client_gone", "error"]
# A batch short of full prepared during the forward before it: run with those inputs, or
# prepared again because posts joined or left it meanwhile.
PreparedAhead = Literal["used", "redone"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Per post: 1.0 is RadarLatencyHigh's threshold (a bucket edge, so "p99 > 1 s" means "over 1 %
# of the answers took more than 1 s per post"), 1.5 and 2.0 (the default RADAR_DEADLINE_MS)
# tell a slow single post from one at its deadline.
PER_POST_BUCKETS = (*LATENCY_BUCKETS[:10], 1.5, 2.0, *LATENCY_BUCKETS[10:])
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SCORE_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))


class ServiceMetrics:
    """The `radar_*` series of one service instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.posts = Counter("radar_posts", "Posts routed (fallbacks included).", registry=r)
        self.auto_pass = Counter("radar_auto_pass", "Posts dispatched to no vertical.", registry=r)
        self.decisions = Counter(
            "radar_decisions", "Per-category decisions.", ["category", "decision"], registry=r
        )
        self.scores = Histogram(
            "radar_score",
            "Router probability per category.",
            ["category"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "radar_fallback",
            "Posts dispatched to every category because the model failed.",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "radar_rejected",
            "Requests refused (each once, where its refusal is answered).",
            ["reason"],
            registry=r,
        )
        self.request_latency = Histogram(
            "radar_request_duration_seconds",
            "Request latency, server side.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency_per_post = Histogram(
            "radar_request_duration_per_post_seconds",
            "Answered routing requests: seconds from arrival to answer, divided by the "
            "request's posts (its _count counts answered requests).",
            ["endpoint"],
            buckets=PER_POST_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "radar_queue_wait_seconds",
            "Time a post waited for its batch.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_time = Histogram(
            "radar_forward_duration_seconds",
            "Model time per batch (the forward; its inputs were prepared ahead).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prepare_time = Histogram(
            "radar_prepare_duration_seconds",
            "Time to prepare a batch's inputs (tokenising, image preprocessing, n-grams), on "
            "the preparing thread while the model runs the batch before.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prepared_ahead = Counter(
            "radar_prepared_ahead",
            "Batches short of full prepared while the model ran the batch before: run with "
            "those inputs (used) or prepared again because posts joined or left (redone).",
            ["outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "radar_batch_size", "Posts per forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("radar_queue_depth", "Posts waiting for a batch.", registry=r)
        self.claimed_posts = Gauge(
            "radar_admission_claimed_posts",
            "Size of the largest request refused for capacity whose room admission keeps "
            "until its retry (0: none); smaller requests are refused to leave it.",
            registry=r,
        )
        self.unanswered = Counter(
            "radar_unanswered_posts",
            "Posts the model decided whose answer never reached the caller (logged, flagged "
            "unanswered; not in radar_posts_total).",
            ["reason"],
            registry=r,
        )
        self.thresholds_info = Gauge(
            "radar_thresholds_info",
            "Active thresholds version (value 1).",
            ["version"],
            registry=r,
        )
        self.model_info = Gauge(
            "radar_model_info", "Loaded model version (value 1).", ["model_version"], registry=r
        )
        self.threshold = Gauge(
            "radar_threshold", "Active threshold tau per category.", ["category"], registry=r
        )
        self.recall_target = Gauge(
            "radar_recall_target",
            "Recall target per category of the active thresholds file (NaN: not recorded).",
            ["category"],
            registry=r,
        )
        self.expected_pass_rate = Gauge(
            "radar_expected_pass_rate",
            "Share of posts each category passed at calibration (active file; NaN: none).",
            ["category"],
            registry=r,
        )
        self.expected_auto_pass_rate = Gauge(
            "radar_expected_auto_pass_rate",
            "Share of posts auto-passed at calibration (active file; NaN: not recorded).",
            registry=r,
        )
        self.expected_auto_pass_rate.set(math.nan)
        self.reload_failures = Counter(
            "radar_thresholds_reload_failures",
            "Thresholds files refused.",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge("radar_ready", "1 when the service is ready.", registry=r)
        self.audits = Counter(
            "radar_audit",
            "Released decisions sampled for audit (sent to the vertical anyway).",
            ["category"],
            registry=r,
        )
        for metric, values in (
            (self.fallbacks, get_args(FallbackReason)),
            (self.rejected, get_args(RejectReason)),
            (self.reload_failures, get_args(RefusalReason)),
            (self.request_latency, get_args(Endpoint)),
            (self.latency_per_post, get_args(Endpoint)),
            (self.unanswered, get_args(UnansweredReason)),
            (self.prepared_ahead, get_args(PreparedAhead)),
        ):
            for value in values:
                metric.labels(value)

    def init_categories(self, categories: Sequence[str]) -> None:
        """Create every labelled child at 0 so rates exist before the first post."""
        for name in categories:
            for decision in get_args(DecisionLabel):
                self.decisions.labels(name, decision)
            self.scores.labels(name)
            self.audits.labels(name)

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))

    def track_claims(self, claimed: Callable[[], int]) -> None:
        self.claimed_posts.set_function(lambda: float(claimed()))

    def set_model(self, model_version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model_version).set(1)

    def set_thresholds(self, active: ActiveThresholds) -> None:
        """The active file: its version, taus and the provenance the alerts compare with
        (NaN where the file has none: a NaN comparison never fires)."""
        self.thresholds_info.clear()
        self.thresholds_info.labels(active.version).set(1)
        for name, tau in active.taus.items():
            self.threshold.labels(name).set(tau)
            self.recall_target.labels(name).set(_or_nan(active.recall_targets.get(name)))
            self.expected_pass_rate.labels(name).set(_or_nan(active.expected_pass_rates.get(name)))
        self.expected_auto_pass_rate.set(_or_nan(active.expected_overall_auto_pass_rate))

    def record_post(
        self,
        scores: dict[str, float],
        dispatch: Sequence[str],
        categories: Sequence[str],
        fallback_reason: FallbackReason | None,
    ) -> None:
        """Count one routed post and its per-category decisions."""
        self.posts.inc()
        if not dispatch:
            self.auto_pass.inc()
        if fallback_reason is not None:
            self.fallbacks.labels(fallback_reason).inc()
        chosen = set(dispatch)
        for name in categories:
            decision: DecisionLabel = "dispatch" if name in chosen else "pass"
            self.decisions.labels(name, decision).inc()
            if name in scores:
                self.scores.labels(name).observe(scores[name])

    def record_answer(self, endpoint: Endpoint, seconds: float, posts: int) -> None:
        """One answered routing request of `posts` posts that took `seconds`. Per post, so
        that a 64-post batch taking 1.2 s (19 ms a post) reads as fast and one post taking
        1.2 s as slow; only answers, so that fast 503s cannot hide slow answers."""
        self.latency_per_post.labels(endpoint).observe(seconds / max(posts, 1))

    def count_rejection(self, reason: RejectReason) -> None:
        """One refused request. Counted only where the refusal is answered (the error
        handlers, admission, the body limit), so a request counts once whatever its posts
        did: its deadline passing for three queued posts is one `deadline`."""
        self.rejected.labels(reason).inc()

    def record_audit(self, categories: Sequence[str]) -> None:
        for name in categories:
            self.audits.labels(name).inc()

    def shadow_series(self, categories: Sequence[str]) -> "ShadowSeries":
        return ShadowSeries(self.registry, categories)

    def quality_series(self, categories: Sequence[str]) -> "QualitySeries":
        return QualitySeries(self.registry, categories)

    def track_decision_log(self, counts: LogCounts) -> None:
        """Export the decision log's counts, read at each scrape."""
        self.registry.register(_DecisionLogCollector(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ShadowSeries:
    """The shadow thresholds' series, beside the active file's own (`app.service.shadow`
    decides under the candidate; it never acts, only these move)."""

    def __init__(self, registry: CollectorRegistry, categories: Sequence[str]) -> None:
        r = registry
        self.posts = Counter("radar_shadow_posts", "Posts decided under the shadow.", registry=r)
        self.auto_pass = Counter(
            "radar_shadow_auto_pass", "Posts the shadow would dispatch nowhere.", registry=r
        )
        self.decisions = Counter(
            "radar_shadow_decisions",
            "Per-category decisions under the shadow thresholds (they do not act).",
            ["category", "decision"],
            registry=r,
        )
        self.info = Gauge(
            "radar_shadow_thresholds_info",
            "Shadow thresholds version (value 1).",
            ["version"],
            registry=r,
        )
        self.threshold = Gauge(
            "radar_shadow_threshold", "Shadow tau per category.", ["category"], registry=r
        )
        self.reload_failures = Counter(
            "radar_shadow_reload_failures",
            "Shadow thresholds files refused.",
            ["reason"],
            registry=r,
        )
        for name in categories:
            for decision in get_args(DecisionLabel):
                self.decisions.labels(name, decision)
        for reason in get_args(RefusalReason):
            self.reload_failures.labels(reason)


class QualitySeries:
    """The online quality gauges (`app.service.quality_export` estimates them from the
    decision log); NaN while unknown."""

    def __init__(self, registry: CollectorRegistry, categories: Sequence[str]) -> None:
        self.recall = Gauge(
            "radar_online_recall",
            "Estimated recall of the active thresholds version's decisions (audited releases, "
            "IPW); NaN: unknown.",
            ["category"],
            registry=registry,
        )
        self.precision = Gauge(
            "radar_dispatch_precision",
            "Share of dispatched posts the vertical judged violating; NaN: no verdicts.",
            ["category"],
            registry=registry,
        )
        self.verdicts = Gauge(
            "radar_quality_verdicts",
            "Verdicts behind the estimates (active version, in the window).",
            ["category", "kind"],
            registry=registry,
        )
        self.recall_upper = Gauge(
            "radar_online_recall_upper",
            "Upper end of the 95 % interval of radar_online_recall (the recall alert fires only "
            "when even this is under target); NaN: unknown.",
            ["category"],
            registry=registry,
        )
        self.shadow_recall = Gauge(
            "radar_shadow_online_recall",
            "Estimated recall the shadow thresholds would have (same verdicts, IPW); NaN: "
            "unknown or no shadow.",
            ["category"],
            registry=registry,
        )


# The decision log's counts as counters: (series name, help, the `LogCounts` field).
_LOG_COUNTERS = (
    (
        "radar_decision_log_write_failures",
        "Flushes of the decision log that failed (retried; decisions stay buffered).",
        "write_failures",
    ),
    (
        "radar_decision_log_dropped",
        "Decisions not logged because the writer fell behind.",
        "dropped",
    ),
    (
        "radar_decision_log_rejected_rows",
        "Decision rows the database refused (set aside so the rows behind them are logged).",
        "rejected_rows",
    ),
    (
        "radar_decision_log_audited_written",
        "Decision rows of audited posts written before their answer left.",
        "audited_written",
    ),
)


class _DecisionLogCollector(Collector):
    """The log's running totals, read when Prometheus scrapes (nothing to keep in step)."""

    def __init__(self, counts: LogCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        now = self.counts.snapshot()
        for name, documentation, field_name in _LOG_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=now[field_name])
        verdicts = CounterMetricFamily(
            "radar_feedback_verdicts",
            "Verdicts received; joined: a logged decision exists for the post and category.",
            labels=["joined"],
        )
        verdicts.add_metric(["true"], now["verdicts_joined"])
        verdicts.add_metric(["false"], now["verdicts_unjoined"])
        yield verdicts


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
