"""The service's quality gauges say what `radar quality` says, from the same log: recall, the
upper end of its 95 % interval, precision, and the shadow's recall."""

import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from app.feedback.quality import estimate_quality
from app.feedback.schema import open_log
from app.service.metrics import QualitySeries
from app.service.quality_export import QualityGauges
from tests.feedback.test_quality import T0, stream, write_log

CATEGORIES = ["nudity", "spam", "absent"]


def test_gauges_equal_the_estimates_of_the_same_log(tmp_path: Path) -> None:
    rows = stream(seed=11, n=4000)
    location = write_log(tmp_path / "log.sqlite3", rows)
    registry = CollectorRegistry()
    gauges = QualityGauges(QualitySeries(registry, CATEGORIES), CATEGORIES)
    shadow_taus = {"spam": 0.3, "nudity": 0.45}
    engine = open_log(location, readonly=True)
    try:
        window_s = 3600 * 24 * 365 * 100  # the synthetic stream is from 2023
        gauges.refresh(engine, window_s, shadow_taus)
        with engine.connect() as conn:
            taken = estimate_quality(conn, ["nudity", "spam"], since=T0 - 1)
            shadow = estimate_quality(conn, ["nudity", "spam"], shadow_taus, since=T0 - 1)
    finally:
        engine.dispose()

    def gauge(name: str, category: str) -> float:
        value = registry.get_sample_value(name, {"category": category})
        assert value is not None
        return value

    for name in ("nudity", "spam"):
        q = taken[name]
        assert q.recall is not None and q.recall_se is not None and not q.few_audited
        assert gauge("radar_online_recall", name) == pytest.approx(q.recall)
        assert q.recall_high is not None and q.recall < q.recall_high < 1.0
        assert gauge("radar_online_recall_upper", name) == pytest.approx(q.recall_high)
        assert gauge("radar_dispatch_precision", name) == pytest.approx(q.precision)
        assert gauge("radar_shadow_online_recall", name) == pytest.approx(shadow[name].recall)
    # No decisions for a category: every gauge unknown, not 0.
    for metric in ("radar_online_recall", "radar_online_recall_upper", "radar_dispatch_precision"):
        assert math.isnan(gauge(metric, "absent"))
