"""Online quality as Prometheus gauges: the service re-estimates, every
`RADAR_QUALITY_REFRESH_S`, each category's recall (from audited releases) and dispatch
precision over the last `RADAR_QUALITY_WINDOW_HOURS` of its decision log, so dashboards and
the `RadarEstimatedRecallLow` alert see what `radar quality` prints.

A gauge is NaN while it cannot be estimated (no verdicts yet, or fewer than 30 audited ones
for recall): an unknown recall must not read as 0 and page, nor as 1 and reassure.
"""

import math
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from app.feedback.quality import estimate_quality
from app.feedback.schema import connect


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
        for name in self.categories:
            self.recall.labels(name).set(math.nan)
            self.precision.labels(name).set(math.nan)
            for kind in ("dispatched", "audited"):
                self.verdicts.labels(name, kind).set(0)

    def refresh(self, log_path: Path, window_s: float) -> None:
        """Re-estimate from the log file (a read-only connection of its own)."""
        conn = connect(log_path, readonly=True)
        try:
            found = estimate_quality(conn, self.categories, since=time.time() - window_s)
        finally:
            conn.close()
        for name, q in found.items():
            recall = None if q.few_audited else q.recall
            self.recall.labels(name).set(math.nan if recall is None else recall)
            self.precision.labels(name).set(math.nan if q.precision is None else q.precision)
            self.verdicts.labels(name, "dispatched").set(q.n_dispatched_with_verdict)
            self.verdicts.labels(name, "audited").set(q.n_audited_with_verdict)
