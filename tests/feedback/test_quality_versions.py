"""Quality per thresholds version (issue 14, item 3): `estimate_quality(thresholds_version=)`
and `radar quality --thresholds-version / --since` on a real log holding decisions under two
versions (SQLite and PostgreSQL, tests/logs.py); and the estimate staying unbiased when the
audit rate changes mid-stream (an audit boost after a promotion), because each decision
carries the rate that was applied to it."""

import datetime
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from app.cli import main
from app.feedback.quality import estimate_quality
from app.feedback.schema import decisions, feedback, open_log
from app.feedback.window import WindowError, iso, parse_since, thresholds_versions
from app.service.metrics import QualitySeries
from app.service.quality_export import QualityGauges
from tests.logs import Location, draw_decision, reading

NewLog = Callable[[], Location]

T0 = 1_790_000_000.0  # 2026-09-21T13:33:20Z
N_OLD, N_NEW = 3000, 1200  # posts decided under v1, then under v2 (promoted at T0 + N_OLD)
PROMOTED = T0 + N_OLD


@dataclass(frozen=True)
class Row:
    post_id: str
    category: str
    score: float
    dispatched: bool
    audited: bool
    audit_rate: float
    version: str
    decided_at: float
    violating: bool

    @property
    def verdict(self) -> bool:
        return self.dispatched or self.audited


def two_versions(seed: int = 3) -> list[Row]:
    """`hate` under v1 at tau 0.7 (misses many), then under v2 at tau 0.3 with its audit rate
    raised from 0.05 to 0.3 (the boost after the promotion); `spam` at 0.5 and 0.1 in both."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(N_OLD + N_NEW):
        new = i >= N_OLD
        version = "v2" if new else "v1"
        for category, tau, rate in (
            ("hate", 0.3 if new else 0.7, 0.3 if new else 0.05),
            ("spam", 0.5, 0.1),
        ):
            violating, score, dispatched, audited = draw_decision(rng, 0.2, tau, rate)
            rows.append(
                Row(f"p{i}", category, score, dispatched, audited, rate, version, T0 + i,
                    violating)
            )  # fmt: skip
    return rows


def decision(r: Row) -> dict[str, object]:
    return {"post_id": r.post_id, "category": r.category, "score": r.score,
            "dispatched": int(r.dispatched), "audited": int(r.audited),
            "audit_rate": r.audit_rate, "thresholds_version": r.version, "model_version": "m1",
            "decided_at": r.decided_at}  # fmt: skip


def verdict(r: Row) -> dict[str, object]:
    return {"post_id": r.post_id, "category": r.category, "violating": int(r.violating),
            "received_at": r.decided_at + 60}  # fmt: skip


def write(location: Location, rows: Iterable[Row]) -> Location:
    """Decisions for every row; a verdict where the vertical judged the post."""
    rows = list(rows)
    engine = open_log(location)
    try:
        with engine.begin() as conn:
            conn.execute(decisions.insert(), [decision(r) for r in rows])
            conn.execute(feedback.insert(), [verdict(r) for r in rows if r.verdict])
    finally:
        engine.dispose()
    return location


def counts(rows: list[Row], category: str) -> tuple[int, int, int]:
    """Decisions, dispatched with a verdict, audited with a verdict."""
    mine = [r for r in rows if r.category == category]
    return len(mine), sum(r.dispatched for r in mine), sum(r.audited for r in mine)


def ipw_recall(rows: Iterable[Row], category: str) -> float:
    """The estimator by hand: hits seen / (hits + each audited miss times 1 / its own rate)."""
    hits = misses = 0.0
    for r in rows:
        if r.category == category and r.violating and r.verdict:
            if r.dispatched:
                hits += 1
            else:
                misses += 1 / r.audit_rate
    return hits / (hits + misses)


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return two_versions()


@pytest.fixture(scope="module")
def log(rows: list[Row], module_log: Location) -> Location:
    return write(module_log, rows)


def test_an_estimate_reads_one_versions_decisions(rows: list[Row], log: Location) -> None:
    with reading(log) as conn:
        spans = thresholds_versions(conn)
        by_version = {v: estimate_quality(conn, thresholds_version=v) for v in ("v1", "v2")}
        absent = estimate_quality(conn, ["hate"], thresholds_version="v9")
    assert [(s.version, s.decisions, s.first, s.last) for s in spans] == [
        ("v1", 2 * N_OLD, T0, PROMOTED - 1),
        ("v2", 2 * N_NEW, PROMOTED, PROMOTED + N_NEW - 1),
    ]
    for version, result in by_version.items():
        mine = [r for r in rows if r.version == version]
        for category in ("hate", "spam"):
            q = result[category]
            n, dispatched, audited = counts(mine, category)
            assert (q.n_decisions, q.n_dispatched_with_verdict, q.n_audited_with_verdict) == (
                n,
                dispatched,
                audited,
            )
            assert q.recall == pytest.approx(ipw_recall(mine, category), abs=1e-9)
    # The fix shows in its own version only: v2's hate recall is far above v1's.
    assert by_version["v2"]["hate"].recall > by_version["v1"]["hate"].recall + 0.3  # type: ignore[operator]
    assert absent["hate"].n_decisions == 0 and absent["hate"].recall is None


def test_gauges_read_the_active_version_and_restart_at_a_new_one(
    rows: list[Row], log: Location
) -> None:
    registry = CollectorRegistry()
    gauges = QualityGauges(QualitySeries(registry, ["hate", "spam"]), ["hate", "spam"])
    window_s = 3600 * 24 * 365 * 100

    def recall(category: str = "hate") -> float:
        value = registry.get_sample_value("radar_online_recall", {"category": category})
        assert value is not None
        return value

    def audited(category: str = "hate") -> float | None:
        labels = {"category": category, "kind": "audited"}
        return registry.get_sample_value("radar_quality_verdicts", labels)

    engine = open_log(log, readonly=True)
    try:
        gauges.restart("v1")
        gauges.refresh(engine, window_s, version="v1")
        assert recall() == pytest.approx(ipw_recall([r for r in rows if r.version == "v1"], "hate"))
        gauges.restart("v2")  # the promotion: unknown at once
        assert math.isnan(recall()) and audited() == 0
        gauges.refresh(engine, window_s, version="v1")  # a refresh begun before it: dropped
        assert math.isnan(recall()) and audited() == 0
        gauges.refresh(engine, window_s, version="v2")
        new = [r for r in rows if r.version == "v2"]
        assert recall() == pytest.approx(ipw_recall(new, "hate"))
        assert audited() == counts(new, "hate")[2]
    finally:
        engine.dispose()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["quality", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_thresholds_version_and_since_give_that_versions_counts(
    rows: list[Row], log: Location, capsys: pytest.CaptureFixture[str]
) -> None:
    new = [r for r in rows if r.version == "v2"]
    base = ["--log", str(log), "--json"]
    code, out, _ = run_cli([*base, "--thresholds-version", "v2"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["thresholds_version"] == "v2"
    for category in ("hate", "spam"):
        q = result["taken"][category]
        n, dispatched, audited = counts(new, category)
        assert (q["n_decisions"], q["n_dispatched_with_verdict"]) == (n, dispatched)
        assert q["n_audited_with_verdict"] == audited

    # From the promotion on, as an absolute time (with a zone, without one = UTC, or an
    # offset): the same decisions as the version's.
    promoted = datetime.datetime.fromtimestamp(PROMOTED, datetime.UTC)
    for spelled in (
        iso(PROMOTED),
        promoted.replace(tzinfo=None).isoformat(),
        promoted.astimezone(datetime.timezone(datetime.timedelta(hours=2))).isoformat(),
    ):
        code, out, _ = run_cli([*base, "--since", spelled], capsys)
        assert code == 0, spelled
        since = json.loads(out)
        assert since["since"] == PROMOTED
        assert since["taken"] == result["taken"], spelled

    # A time inside v1 with v1 only: v1's decisions from then on.
    code, out, _ = run_cli([*base, "--since", iso(T0 + 1000), "--thresholds-version", "v1"], capsys)
    assert json.loads(out)["taken"]["hate"]["n_decisions"] == N_OLD - 1000

    # The relative forms still work: the stream is from 2026-09, so nothing in the last 6 h.
    for relative in (["--since", "6h"], ["--since-hours", "6"]):
        code, out, _ = run_cli([*base, *relative], capsys)
        assert (code, json.loads(out)["taken"]) == (0, {})

    code, out, _ = run_cli(["--log", str(log), "--thresholds-version", "v2"], capsys)
    assert code == 0 and "thresholds version v2" in out.splitlines()[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "yesterday"], "--since: not an ISO-8601 time or a duration: 'yesterday'"),
        (["--since", "2026-13-01"], "--since: not an ISO-8601 time"),
        (["--thresholds-version", "v9"], "no decisions under 'v9'"),
    ],
)
def test_cli_refuses_a_bad_time_or_an_unknown_version(
    log: Location, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run_cli(["--log", str(log), *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("radar quality: ") and message in err and "Traceback" not in err
    if "--thresholds-version" in argv:  # it says which versions the log has, and when
        assert f"v1 (6,000 decisions, {iso(T0)} to {iso(PROMOTED - 1)})" in err
        assert "v2 (2,400 decisions" in err


def test_since_and_since_hours_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["quality", "--since", "1h", "--since-hours", "1"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_parse_since_forms() -> None:
    now = 1_800_000_000.0
    assert parse_since("90m", now) == now - 5400
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("30s", now) == now - 30
    assert parse_since("2027-01-15T08:00:00Z", now) == parse_since("2027-01-15 09:00+01:00", now)
    assert (
        parse_since("2027-01-15", now)
        == datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC).timestamp()
    )
    for bad in ("", "h", "-1h", "6 hours", "2027-01-15T25:00"):
        with pytest.raises(WindowError):
            parse_since(bad, now)


def test_the_estimate_stays_unbiased_when_the_audit_rate_changes_mid_stream(
    tmp_path: Path,
) -> None:
    """One fixed population of 6,000 posts whose recall drops halfway (0.9, then 0.5), and
    whose audit rate is raised halfway from 0.02 to 0.2 (a boost after the drift was seen):
    over 150 re-drawn audit samples, each through the real log and query, the mean estimate
    equals the true recall of the whole stream. Weighting every audit by one rate (the
    later one, or the earlier) is far off: the test can tell."""
    rng = np.random.default_rng(20)
    n, half = 6000, 3000
    violating = rng.random(n) < 0.1
    caught = np.where(np.arange(n) < half, rng.random(n) < 0.9, rng.random(n) < 0.5)
    dispatched = violating & caught | (~violating & (rng.random(n) < 0.3))
    rate = np.where(np.arange(n) < half, 0.02, 0.2)
    true_recall = (violating & dispatched).sum() / violating.sum()

    def row(i: int, audited: bool) -> Row:
        return Row(f"p{i}", "hate", 0.5, bool(dispatched[i]), audited, float(rate[i]), "v1",
                   T0 + i, bool(violating[i]))  # fmt: skip

    # The dispatched posts and their verdicts are the same in every draw: written once. Each
    # draw replaces the audited released posts; the released posts never audited have no
    # verdict and weigh in no estimate, so they are left out.
    location = write(tmp_path / "mid.sqlite3", [row(i, False) for i in np.flatnonzero(dispatched)])
    engine = open_log(location)
    estimates, one_rate_late, one_rate_early = [], [], []
    try:
        for _ in range(150):
            audited = ~dispatched & (rng.random(n) < rate)
            drawn = [row(i, True) for i in np.flatnonzero(audited)]
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM feedback WHERE post_id IN "
                                  "(SELECT post_id FROM decisions WHERE audited = 1)"))  # fmt: skip
                conn.execute(text("DELETE FROM decisions WHERE audited = 1"))
                conn.execute(decisions.insert(), [decision(r) for r in drawn])
                conn.execute(feedback.insert(), [verdict(r) for r in drawn])
            with engine.connect() as conn:
                q = estimate_quality(conn, ["hate"])["hate"]
            assert q.recall is not None and q.n_audited_with_verdict == len(drawn)
            estimates.append(q.recall)
            hits = (violating & dispatched).sum()
            seen = (violating & audited).sum()
            one_rate_late.append(hits / (hits + seen / 0.2))
            one_rate_early.append(hits / (hits + seen / 0.02))
    finally:
        engine.dispose()
    mean, se = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
    assert abs(mean - true_recall) < max(3 * se, 0.005), (mean, true_recall, se)
    # One rate for all: the first half's misses undercounted tenfold, or the second's
    # overcounted tenfold: biases of several standard errors of their own means.
    late_se = np.std(one_rate_late) / np.sqrt(len(one_rate_late))
    assert np.mean(one_rate_late) - true_recall > max(5 * late_se, 0.03)
    assert true_recall - np.mean(one_rate_early) > 0.3
