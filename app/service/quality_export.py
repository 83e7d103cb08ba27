"""Online quality as Prometheus gauges: the service re-estimates, every
`RADAR_QUALITY_REFRESH_S`, each category's recall (from audited releases) and dispatch
precision over the last `RADAR_QUALITY_WINDOW_HOURS` of its decision log, so dashboards and
the `RadarEstimatedRecallLow` alert see what `radar quality` prints.

The gauges read only the decisions of the active thresholds version (`radar quality
--thresholds-version`): at a promotion they restart, NaN at once and until the new version
has verdicts enough of its own, rather than go on reading the old version's decisions, which
fill most of a 24 h window for hours (issue 14: the alert kept firing 26 min after a fix). A
version rolled back to is read with its earlier decisions in the window: the same taus. The
series keep their labels (no version label): the alerts and dashboards select them as
before, and `radar_thresholds_info{version}` says which version they describe.

With shadow thresholds loaded, `radar_shadow_online_recall` estimates from the same verdicts
the recall the candidate's tau would have had (`radar quality --thresholds`), so a dashboard
can compare both before promotion. It reads every version's decisions in the window: the
weights come from what was done to each post, whichever taus did it.

A gauge is NaN while it cannot be estimated (no verdicts yet, or fewer than 30 audited ones
for recall): an unknown recall must not read as 0 and page, nor as 1 and reassure.
"""

import math
import threading
import time
from collections.abc import Mapping, Sequence

from sqlalchemy import Engine

from app.feedback.quality import CategoryQuality, estimate_quality
from app.service.metrics import QualitySeries


class QualityGauges:
    """Re-estimates online quality and sets the `QualitySeries` gauges."""

    def __init__(self, series: QualitySeries, categories: Sequence[str]) -> None:
        self.categories = tuple(categories)
        self.version: str | None = None  # the thresholds version the gauges describe
        self._lock = threading.Lock()  # a refresh in its thread against a restart
        self.series = series
        self._unknown()

    def restart(self, version: str) -> None:
        """A new thresholds version is active: every gauge unknown until the next refresh
        reads that version's decisions (an older refresh still running is discarded)."""
        with self._lock:
            self.version = version
            self._unknown()

    def _unknown(self) -> None:
        for name in self.categories:
            self.series.recall.labels(name).set(math.nan)
            self.series.recall_upper.labels(name).set(math.nan)
            self.series.shadow_recall.labels(name).set(math.nan)
            self.series.precision.labels(name).set(math.nan)
            for kind in ("dispatched", "audited"):
                self.series.verdicts.labels(name, kind).set(0)

    def refresh(
        self,
        engine: Engine,
        window_s: float,
        shadow_taus: Mapping[str, float] | None = None,
        version: str | None = None,
    ) -> None:
        """Re-estimate from the log: the decisions of thresholds `version` (None: every
        version's) in the window; the shadow's gauges from `shadow_taus` (None: no shadow).
        Left as they are when another version became active meanwhile (`restart`)."""
        since = time.time() - window_s
        with engine.connect() as conn:
            found = estimate_quality(conn, self.categories, since=since, thresholds_version=version)
            under = {}
            if shadow_taus:
                under = estimate_quality(conn, self.categories, shadow_taus, since)
        with self._lock:
            if version is None or version == self.version:
                self._set(found, under)

    def _set(
        self, found: Mapping[str, CategoryQuality], under: Mapping[str, CategoryQuality]
    ) -> None:
        for name, q in found.items():
            self.series.recall.labels(name).set(_recall(q))
            self.series.recall_upper.labels(name).set(_recall_upper(q))
            self.series.precision.labels(name).set(math.nan if q.precision is None else q.precision)
            self.series.verdicts.labels(name, "dispatched").set(q.n_dispatched_with_verdict)
            self.series.verdicts.labels(name, "audited").set(q.n_audited_with_verdict)
        for name in self.categories:
            shadow = under.get(name)
            recall = math.nan if shadow is None else _recall(shadow)
            self.series.shadow_recall.labels(name).set(recall)


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
