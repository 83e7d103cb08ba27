"""Online quality as Prometheus gauges: the service re-estimates, every
`RADAR_QUALITY_REFRESH_S`, each category's recall (from audited releases) and dispatch
precision over the last `RADAR_QUALITY_WINDOW_HOURS` of its decision log, so dashboards and
the `RadarEstimatedRecallLow` alert see what `radar quality` prints.

With shadow thresholds loaded, `radar_shadow_online_recall` estimates from the same verdicts
the recall the candidate's tau would have had (`radar quality --thresholds`), so a dashboard
can compare both before promotion.

A gauge is NaN while it cannot be estimated (no verdicts yet, or fewer than 30 audited ones
for recall): an unknown recall must not read as 0 and page, nor as 1 and reassure.
"""

import math
import time
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import Engine

from app.feedback.quality import CategoryQuality, estimate_quality


class QualityGauges:
    def __init__(self, registry: CollectorRegistry, categories: Sequence[str]) -> None:
        self.categories = tuple(categories)
        self.recall = Gauge(
            "radar_online_recall",
            "Estimated recall of the active decisions (audited releases, IPW); NaN: unknown.",
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
            "Verdicts behind the estimates, in the window.",
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
        for name in self.categories:
            self.recall.labels(name).set(math.nan)
            self.recall_upper.labels(name).set(math.nan)
            self.shadow_recall.labels(name).set(math.nan)
            self.precision.labels(name).set(math.nan)
            for kind in ("dispatched", "audited"):
                self.verdicts.labels(name, kind).set(0)

    def refresh(
        self, engine: Engine, window_s: float, shadow_taus: Mapping[str, float] | None = None
    ) -> None:
        """Re-estimate from the log; the shadow's gauges from `shadow_taus` (None: no shadow)."""
        since = time.time() - window_s
        with engine.connect() as conn:
            found = estimate_quality(conn, self.categories, since=since)
            under = {}
            if shadow_taus:
                under = estimate_quality(conn, self.categories, shadow_taus, since)
        for name, q in found.items():
            self.recall.labels(name).set(_recall(q))
            self.recall_upper.labels(name).set(_recall_upper(q))
            self.precision.labels(name).set(math.nan if q.precision is None else q.precision)
            self.verdicts.labels(name, "dispatched").set(q.n_dispatched_with_verdict)
            self.verdicts.labels(name, "audited").set(q.n_audited_with_verdict)
        for name in self.categories:
            shadow = under.get(name)
            self.shadow_recall.labels(name).set(math.nan if shadow is None else _recall(shadow))


def _recall(q: CategoryQuality) -> float:
    """NaN unless estimated from enough audited verdicts."""
    return math.nan if q.few_audited or q.recall is None else q.recall


def _recall_upper(q: CategoryQuality) -> float:
    """The upper end of recall's 95 % interval; the recall itself while no miss was seen
    (no interval)."""
    recall = _recall(q)
    if math.isnan(recall) or q.recall_high is None:
        return recall
    return q.recall_high
