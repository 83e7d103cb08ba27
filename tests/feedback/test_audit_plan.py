"""The audit planner (app.feedback.audit_plan) and `radar quality plan` (issue 14, item 1).

The plan's figures are checked by simulation: audits drawn at the planned rate for the
planned time, the interval computed with the service's own `recall_interval`, and the
realised median width compared with the target. The CLI runs against a decision log written
by the service's own writer (`DecisionLog`), on SQLite and on a real PostgreSQL."""

import argparse
import inspect
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from app.cli import CLI_ONLY, build_parser, main
from app.feedback.audit_plan import (
    MIN_AUDITED,
    PlanError,
    Traffic,
    audited_needed,
    interval_width,
    median_width,
    plan,
)
from app.feedback.log import DecisionLog, DecisionRecord, Verdict
from app.feedback.quality import estimate_quality, recall_interval
from tests.logs import Location, draw_decision
from tests.test_cli_flags import names_read

NewLog = Callable[[], Location]

# A busy category: 2,000 posts/h, 60 % released, 5 % violating.
BUSY = Traffic("hate", posts_per_hour=2000.0, pass_rate=0.6, prevalence=0.05)
RECALL, WIDTH, WINDOW = 0.9, 0.10, 24.0


def simulated_widths(
    traffic: Traffic, recall: float, rate: float, hours: float, draws: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Widths of the service's interval, and audited counts, over `draws` streams of `hours`
    of `traffic` audited at `rate`: posts violate with the base rate, a violating post is
    dispatched with probability `recall`, the other released posts make up the pass rate,
    and each released post is audited with probability `rate`."""
    rng = np.random.default_rng(seed)
    posts = round(traffic.posts_per_hour * hours)
    violating = rng.binomial(posts, traffic.prevalence, draws)
    hits = rng.binomial(violating, recall)
    misses = violating - hits
    clean_released_share = (traffic.pass_rate - traffic.prevalence * (1 - recall)) / (
        1 - traffic.prevalence
    )
    clean_released = rng.binomial(posts - violating, clean_released_share)
    seen = rng.binomial(misses, rate)  # audited misses
    audited = seen + rng.binomial(clean_released, rate)
    widths = []
    for h, k in zip(hits, seen, strict=True):
        low, high = recall_interval(float(h), int(k), 1 / rate)  # each audit stands for 1/rate
        widths.append(high - low)
    return np.array(widths), audited


def test_the_planned_rate_reaches_the_target_width_within_the_window() -> None:
    p = plan(BUSY, recall=RECALL, width=WIDTH, window_hours=WINDOW, rate=0.01)
    assert p.rate_needed is not None and 0 < p.rate_needed < 1
    widths, audited = simulated_widths(BUSY, RECALL, p.rate_needed, WINDOW, 2000, seed=1)
    assert np.median(widths) == pytest.approx(WIDTH, rel=0.03)  # close to the target
    assert np.median(audited) == pytest.approx(p.audited_needed, rel=0.03)
    # and not bought with far more audits than needed: 80 % of them falls short
    fewer, _ = simulated_widths(BUSY, RECALL, 0.8 * p.rate_needed, WINDOW, 2000, seed=2)
    assert np.median(fewer) > 1.04 * WIDTH
    # the vertical load is the audits over what the router dispatches to it
    assert p.audits_per_hour_needed is not None
    assert p.audits_per_hour_needed == pytest.approx(p.rate_needed * 2000 * 0.6)
    assert p.extra_load_needed == pytest.approx(p.audits_per_hour_needed / (2000 * 0.4))


def test_the_time_at_a_given_rate_reaches_the_target_width() -> None:
    rate = 0.05
    p = plan(BUSY, recall=RECALL, width=WIDTH, window_hours=WINDOW, rate=rate)
    assert p.hours_needed is not None
    widths, audited = simulated_widths(BUSY, RECALL, rate, p.hours_needed, 2000, seed=3)
    assert np.median(widths) == pytest.approx(WIDTH, rel=0.03)
    assert np.median(audited) == pytest.approx(p.audited_needed, rel=0.03)
    assert p.reached_in_window == (p.hours_needed <= WINDOW)
    # the width reached depends on the audited count, not on the rate that gathered it
    slow = plan(BUSY, recall=RECALL, width=WIDTH, window_hours=WINDOW, rate=rate / 5)
    assert slow.audited_needed == p.audited_needed
    assert slow.hours_needed == pytest.approx(5 * p.hours_needed)


@pytest.mark.parametrize("recall", [0.6, 0.8, 0.95])
def test_other_recalls_and_widths_meet_their_target(recall: float) -> None:
    width = 0.15
    p = plan(BUSY, recall=recall, width=width, window_hours=1000.0, rate=0.01)
    assert p.rate_needed is not None
    widths, _ = simulated_widths(BUSY, recall, p.rate_needed, 1000.0, 1000, seed=4)
    assert np.median(widths) == pytest.approx(width, rel=0.05)


def test_at_the_default_rate_a_few_thousand_posts_never_show_a_recall() -> None:
    # The drill of issue 14: ~3,000 posts a day at RADAR_AUDIT_RATE=0.01.
    few = Traffic("hate", posts_per_hour=125.0, pass_rate=0.6, prevalence=0.05)
    p = plan(few, recall=RECALL, width=WIDTH, window_hours=WINDOW, rate=0.01)
    assert p.audited_in_window == pytest.approx(18.0)  # 0.01 * 1,800 released a day
    assert not p.reached_in_window
    assert p.hours_to_gauge is not None and p.hours_to_gauge > WINDOW  # still NaN at 24 h
    assert p.hours_needed is not None and p.hours_needed > 20 * WINDOW  # weeks, not hours
    assert p.rate_needed is not None and p.rate_needed > 20 * 0.01
    # as simulated: the gauge (>= 30 audited verdicts in the window) stays NaN almost always
    _, audited = simulated_widths(few, RECALL, 0.01, WINDOW, 4000, seed=5)
    assert np.mean(audited < MIN_AUDITED) > 0.98


def test_the_gauge_minimum_is_the_service_s() -> None:
    default = inspect.signature(estimate_quality).parameters["min_audited"].default
    assert default == MIN_AUDITED
    # a target so loose that a handful of audits meets it still needs the gauge's minimum
    p = plan(BUSY, recall=RECALL, width=0.9, window_hours=WINDOW, rate=0.01)
    assert p.audited_for_width < MIN_AUDITED == p.audited_needed


def test_median_width_is_the_exact_median_over_the_binomial() -> None:
    # Small n: every k evaluated; larger n: k in stretches. Both against a full enumeration.
    for n, share in [(40, 0.05), (3000, 0.02), (20_000, 0.05)]:
        ks = np.arange(n + 1)
        pmf = binom.pmf(ks, n, share)
        keep = pmf > 1e-12
        widths = np.array([interval_width(2.0 * n, int(k), 1.0) for k in ks[keep]])
        order = np.argsort(widths)
        exact = widths[order][np.searchsorted(np.cumsum(pmf[keep][order]), 0.5)]
        assert median_width(n, share, 2.0) == pytest.approx(exact, rel=0.01)


def test_audited_needed_is_the_smallest_count_that_meets_the_width() -> None:
    n, width = audited_needed(BUSY, RECALL, WIDTH)
    share, per_audit = 10 / 1200, 90 / 1200  # misses and hits per released post
    assert width == median_width(n, share, per_audit) <= WIDTH
    assert median_width(int(n * 0.98), share, per_audit) > WIDTH


@pytest.mark.parametrize(
    ("traffic", "kwargs", "message"),
    [
        (BUSY, {"width": 0.0}, "interval width must be in (0, 1)"),
        (BUSY, {"width": 1.0}, "interval width must be in (0, 1)"),
        (BUSY, {"recall": 1.0}, "assumed recall must be in (0, 1)"),
        (BUSY, {"rate": 1.5}, "audit rate must be in [0, 1]"),
        (BUSY, {"window_hours": 0.0}, "window must be > 0 hours"),
        (Traffic("x", 0.0, 0.5, 0.1), {}, "posts per hour must be > 0"),
        (Traffic("x", 10.0, 0.0, 0.1), {}, "releases nothing"),
        (Traffic("x", 10.0, 0.5, 0.0), {}, "base rate must be in (0, 1]"),
        (Traffic("x", 10.0, 0.01, 0.5), {}, "misses more posts"),
        (Traffic("x", 10.0, 0.5, 0.1), {"width": 1e-5}, "ask for a wider interval"),
    ],
)
def test_figures_that_make_no_plan_are_refused(
    traffic: Traffic, kwargs: dict[str, float], message: str
) -> None:
    args = {"recall": RECALL, "width": WIDTH, "window_hours": WINDOW, "rate": 0.01} | kwargs
    with pytest.raises(PlanError, match=re.escape(message)):
        plan(traffic, **args)  # type: ignore[arg-type]


def test_no_time_at_a_rate_of_zero() -> None:
    p = plan(BUSY, recall=RECALL, width=WIDTH, window_hours=WINDOW, rate=0.0)
    assert p.hours_needed is None and p.hours_to_gauge is None and not p.reached_in_window


# ---- the CLI, on a decision log written by the service's writer ----------------------------

HOURS = 10.0
POSTS = 3000
# category: (tau, audit rate, base rate)
CATEGORIES = {"spam": (0.5, 0.02, 0.2), "hate": (0.6, 0.05, 0.1)}


def write_stream(location: Location, now: float, posts: int = POSTS) -> dict[str, dict[str, int]]:
    """`posts` posts spread over the last HOURS hours, every category decided, the dispatched
    and audited ones judged (POST /feedback's path); returns what was written, per category."""
    rng = np.random.default_rng(11)
    log = DecisionLog(location, retention_s=1e9, max_rows=10**8)
    log.start()
    counts = {c: {"decisions": 0, "released": 0, "hits": 0} for c in CATEGORIES}
    try:
        records, verdicts = [], []
        for i in range(posts):
            decided_at = now - 3600 * HOURS + i * 3600 * HOURS / (posts - 1)
            for category, (tau, rate, base) in CATEGORIES.items():
                violating, score, dispatched, audited = draw_decision(rng, base, tau, rate)
                records.append(
                    DecisionRecord(
                        f"p{i}", category, score, dispatched, audited, rate, "v1", "m1", decided_at
                    )
                )
                if dispatched or audited:
                    verdicts.append(Verdict(f"p{i}", category, violating))
                counts[category]["decisions"] += 1
                counts[category]["released"] += not dispatched
                counts[category]["hits"] += dispatched and violating
        log.record(records)
        log.flush()
        log.add_feedback(verdicts)
    finally:
        log.stop()
    return counts


@pytest.fixture
def stream_log(new_log: NewLog) -> tuple[Location, dict[str, dict[str, int]]]:
    location = new_log()
    return location, write_stream(location, time.time())


def test_cli_plans_from_the_log(
    stream_log: tuple[Location, dict[str, dict[str, int]]], capsys: pytest.CaptureFixture[str]
) -> None:
    location, counts = stream_log
    argv = ["quality", "plan", "--log", str(location), "--width", "0.1", "--recall", "0.9"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["traffic"]["source"] == "log"
    assert out["traffic"]["hours"] == pytest.approx(HOURS, rel=1e-6)
    assert out["skipped"] == {}
    for category, (_, rate, _) in CATEGORIES.items():
        got, c = out["categories"][category], counts[category]
        assert got["posts_per_hour"] == pytest.approx(POSTS / HOURS)
        assert got["pass_rate"] == pytest.approx(c["released"] / POSTS)
        # base rate from the counted hits at the assumed recall
        assert got["prevalence"] == pytest.approx(c["hits"] / (POSTS * 0.9))
        assert got["rate"] == pytest.approx(rate) and got["rate_from"] == "log"
        assert got["prevalence_from"] == "log" and got["pass_from"] == "log"
        expected = plan(
            Traffic(category, POSTS / HOURS, c["released"] / POSTS, c["hits"] / (POSTS * 0.9)),
            recall=0.9,
            width=0.1,
            window_hours=24.0,
            rate=rate,
        )
        assert got["audited_needed"] == expected.audited_needed
        assert got["rate_needed"] == pytest.approx(expected.rate_needed)
        assert got["hours_needed"] == pytest.approx(expected.hours_needed)

    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "audit plan: a 95% recall interval at most 0.1 wide" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.split()[:1] == ["hate"]}
    assert "(log)" in rows["hate"]
    needed = out["categories"]["hate"]
    assert str(needed["audited_needed"]) in text
    assert f"{needed['rate']:.4f} (log)" in text


def test_cli_given_overrides_and_proposed_rate(
    stream_log: tuple[Location, dict[str, dict[str, int]]], capsys: pytest.CaptureFixture[str]
) -> None:
    location, _ = stream_log
    argv = ["quality", "plan", "--log", str(location), "--json", "--rate", "0.2"]
    assert main([*argv, "--pass-rate", "hate=0.5", "--prevalence", "hate=0.04"]) == 0
    hate = json.loads(capsys.readouterr().out)["categories"]["hate"]
    assert (hate["pass_rate"], hate["pass_from"]) == (0.5, "given")
    assert (hate["prevalence"], hate["prevalence_from"]) == (0.04, "given")
    assert (hate["rate"], hate["rate_from"]) == (0.2, "given")
    assert hate["hours_needed"] == pytest.approx(hate["audited_needed"] / (0.2 * 300 * 0.5))


def test_cli_plans_from_given_traffic_and_a_thresholds_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "t.yaml"
    file.write_text(
        "version: a\nmodel_version: m\ncategories:\n"
        "  spam: {tau: 0.4, expected_auto_pass_rate: 0.8, n_positive: 20, n_annotated: 400}\n"
        "  hate: {tau: 0.5, expected_auto_pass_rate: 0.6}\n"
    )
    argv = ["quality", "plan", "--posts-per-hour", "1000", "--thresholds", str(file), "--json"]
    assert main(argv) == 0  # hate has no base rate: planned without it, said so
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    spam = out["categories"]["spam"]
    assert (spam["pass_rate"], spam["prevalence"], spam["prevalence_from"]) == (0.8, 0.05, "file")
    assert spam["rate"] == 0.01 and spam["rate_from"] == "default"
    assert "hate" in out["skipped"] and "--prevalence hate=X" in captured.err
    assert main([*argv, "--prevalence", "hate=0.02"]) == 0
    assert set(json.loads(capsys.readouterr().out)["categories"]) == {"spam", "hate"}

    argv = ["quality", "plan", "--posts-per-hour", "125", "--pass-rate", "hate=0.6"]
    assert main([*argv, "--prevalence", "hate=0.05"]) == 0
    text = capsys.readouterr().out
    assert "125 posts/h, given" in text
    assert "18 of " in text  # at the default 0.01 the window holds 18 audits


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "1.5"], "interval width must be in (0, 1)"),
        (["--recall", "0"], "assumed recall must be in (0, 1)"),
        (["--rate", "-0.1"], "audit rate must be in [0, 1]"),
        (["--pass-rate", "nope=0.5"], "--pass-rate: unknown categories ['nope']"),
        (["--prevalence", "spam"], "expected CATEGORY=R"),
        (["--prevalence", "spam=2"], "expected CATEGORY=R"),
        (["--pass-rate", "spam=0.5", "spam=0.6"], "'spam' given twice"),
        (["--posts-per-hour", "100"], "--posts-per-hour gives the traffic"),
        (["--since-hours", "-1"], "--since-hours must be > 0"),
        (["--since-hours", "1e-6"], "no decisions in the log's window"),
        (["--thresholds", "absent.yaml"], "cannot read"),
    ],
)
def test_cli_errors_exit_2_without_a_traceback(
    new_log: NewLog, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    location = new_log()
    write_stream(location, time.time(), posts=50)
    assert main(["quality", "plan", "--log", str(location), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radar quality plan: ") and message in err, err
    assert "Traceback" not in err


def test_cli_on_a_missing_or_empty_log(
    new_log: NewLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["quality", "plan", "--log", str(tmp_path / "absent.sqlite3")]) == 2
    assert "no decision log at" in capsys.readouterr().err
    empty = new_log()
    log = DecisionLog(empty, retention_s=1e9, max_rows=1000)
    log.start()
    log.stop()
    assert main(["quality", "plan", "--log", str(empty)]) == 2
    assert "no decisions in the log's window" in capsys.readouterr().err
    assert main(["quality", "plan", "--posts-per-hour", "10"]) == 2
    assert "needs the categories" in capsys.readouterr().err


def test_radar_quality_keeps_its_own_flags_checked() -> None:
    # tests/test_cli_flags.py checks leaf commands; with `plan` under it, `radar quality`
    # itself is no longer a leaf there, so its flags are checked here the same way.
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    quality = commands.choices["quality"]
    dests = {
        a.dest
        for a in quality._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    }
    assert dests and dests - CLI_ONLY - names_read(quality.get_default("handler")) == set()
    args = build_parser().parse_args(["quality", "--json"])
    assert args.handler is quality.get_default("handler") and args.quality_command is None
