"""The operations drill as a test (issue 14, item 8): `benchmarks/ops_drill.py` at CI sizes.

A real `radar serve` on the tiny router and a real Prometheus with the shipped alerts.yml, in
which only RadarEstimatedRecallLow's `for` is shortened (30m -> 15s; `drill_rules` checks that
every expression is the shipped one), and short clocks (quality refresh 1 s, window 72 s,
scrape and evaluation 1 s). One category's recall drops in a seeded synthetic stream; the
alert must fire for it alone within its `for` plus the time the estimate takes to fall;
`radar calibrate --only` lowers that category's tau alone; the candidate is shadowed, then
promoted, and the alert must resolve within seconds and stay quiet once the new version's
own estimate is back above target. Prometheus missing: skipped, or failed under
RADAR_REQUIRE_DEPLOY_TOOLS=1 (CI). About 3.5 minutes on a shared 2-core machine.
"""

import math
from pathlib import Path

import pytest
import yaml

from benchmarks.drill_stack import ALERTS, drill_rules
from benchmarks.ops_drill import ALERT, CI, run_drill
from tests.deploy.support import require_tool

pytestmark = pytest.mark.slow


def test_the_drill_rules_differ_from_the_shipped_ones_only_in_that_for() -> None:
    text, changed = drill_rules({ALERT: "15s"})
    assert changed == {ALERT: ("30m", "15s")}
    shipped, drill = yaml.safe_load(ALERTS.read_text()), yaml.safe_load(text)
    for group in shipped["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == ALERT:
                rule["for"] = "15s"
    assert drill == shipped


def test_a_recall_drop_fires_is_fixed_for_its_category_alone_and_resolves(
    tiny_store: Path, tmp_path: Path
) -> None:
    prometheus = require_tool("prometheus")
    lines: list[str] = []
    result = run_drill(CI, tiny_store, prometheus, tmp_path, lines.append)
    report = "\n".join([*lines, *result.lines()])
    print(report)  # in the test's output with -s or on failure
    c = CI.category

    # Fired for the drifted category only (noise may make another pending, never for `for`),
    # within its `for` plus the time the estimate takes to fall.
    assert result.alert_categories == {c}, report
    assert result.fired_after_drift_s <= CI.fire_timeout_s
    # Pending to firing is the `for` (give or take the watcher's 0.5 s polls and evaluations).
    held = result.fired_after_drift_s - result.pending_after_drift_s
    assert CI.for_s - 1 <= held <= CI.for_s + 5, report
    assert result.recall_when_fired < 0.8 and result.upper_when_fired < 0.9, report

    # Recalibrated alone: a lower tau for it, the others' entries copied.
    assert result.tau_after[c] < result.tau_before[c]
    assert {n: t for n, t in result.tau_after.items() if n != c} == {
        n: t for n, t in result.tau_before.items() if n != c
    }
    # The shadow's tau and its recall on the same verdicts, before it acts.
    assert result.shadow_tau == pytest.approx(result.tau_after[c])
    assert result.shadow_recall >= 0.9 > result.active_recall_before_promote, report
    assert "(version drill-2)" in result.quality_output  # radar quality --thresholds ran

    # Promoted: resolved within seconds (the gauges restart: NaN never fires), and quiet once
    # the new version's own estimate has a value, above target - 0.10.
    assert result.resolved_after_promote_s <= CI.resolve_timeout_s
    assert not math.isnan(result.recall_after_fix) and result.recall_after_fix >= 0.8, report
    assert result.counts["posts"] > 0 and result.counts[f"audited misses {c}"] > 0
