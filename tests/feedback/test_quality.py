"""IPW quality estimates (app.feedback.quality) on a seeded synthetic decision stream: equal
to a hand computation, close to the truth the estimator never sees; and `radar quality`.
Every test runs on an SQLite log and on a real PostgreSQL one (tests/logs.py)."""

import json
import math
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.feedback.quality import CategoryQuality, estimate_quality, recall_interval
from app.feedback.schema import decisions, feedback, open_log
from tests.logs import Location, draw_decision, reading

NewLog = Callable[[], Location]

# category: (prevalence, tau, audit rate)
DESIGN = {"spam": (0.2, 0.5, 0.1), "nudity": (0.1, 0.6, 0.2)}
N_POSTS = 20_000
T0 = 1_700_000_000.0


@dataclass(frozen=True)
class Row:
    """One decision, with the ground truth that only reaches the log as a verdict."""

    post_id: str
    category: str
    score: float | None
    dispatched: bool
    audited: bool
    audit_rate: float
    decided_at: float
    violating: bool  # the truth
    verdict: bool  # whether the vertical sent a verdict (dispatched or audited)


def stream(seed: int = 7, n: int = N_POSTS) -> list[Row]:
    """Scores correlated with the truth (Beta(5,2) for violating posts, Beta(2,5) for the
    rest); dispatch iff score > tau; a released post is audited with the category's rate."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for category, (prevalence, tau, rate) in DESIGN.items():
            violating, score, dispatched, audited = draw_decision(rng, prevalence, tau, rate)
            rows.append(
                Row(
                    f"p{i}", category, score, dispatched, audited, rate, T0 + i,
                    violating, dispatched or audited,
                )
            )  # fmt: skip
    return rows


def write_log(location: Location, rows: Iterable[Row]) -> Location:
    """Decisions for every row; feedback only where the vertical judged the post."""
    rows = list(rows)
    engine = open_log(location)
    try:
        with engine.begin() as conn:
            if not rows:
                return location
            conn.execute(
                decisions.insert(),
                [
                    {"post_id": r.post_id, "category": r.category, "score": r.score,
                     "dispatched": int(r.dispatched), "audited": int(r.audited),
                     "audit_rate": r.audit_rate, "thresholds_version": "v1",
                     "model_version": "m1", "decided_at": r.decided_at}
                    for r in rows
                ],
            )  # fmt: skip
            judged = [
                {"post_id": r.post_id, "category": r.category, "violating": int(r.violating),
                 "received_at": r.decided_at + 60}
                for r in rows if r.verdict
            ]  # fmt: skip
            if judged:
                conn.execute(feedback.insert(), judged)
    finally:
        engine.dispose()
    return location


def hand(rows: list[Row], category: str, tau: float | None = None) -> dict[str, float | None]:
    """The estimator written out with loops, from the rows the log holds a verdict for."""
    w_viol = w_hit = w_rule = 0.0
    n_audited = 0
    judged_violating = []  # (w, rule) of each violating row with a verdict
    for r in rows:
        if r.category != category or not r.verdict or r.score is None:
            continue
        if r.dispatched:
            w = 1.0
        elif r.audited:
            w = 1.0 / r.audit_rate
            n_audited += 1
        else:
            continue
        rule = r.dispatched if tau is None else r.score > tau
        if rule:
            w_rule += w
        if r.violating:
            w_viol += w
            judged_violating.append((w, rule))
            if rule:
                w_hit += w
    recall = w_hit / w_viol if n_audited and w_viol else None
    se = None
    if recall is not None and any(not rule for _, rule in judged_violating):
        variance = sum(w * (w - 1) * (rule - recall) ** 2 for w, rule in judged_violating)
        se = math.sqrt(variance) / w_viol
    return {
        "recall": recall,
        "precision": w_hit / w_rule if w_rule else None,
        "estimated_misses": w_viol - w_hit,
        "recall_se": se,
    }


def truth(rows: list[Row], category: str, tau: float | None = None) -> dict[str, float]:
    """Recall and precision over every post (the whole ground truth)."""
    mine = [r for r in rows if r.category == category]
    rule = [r.dispatched if tau is None else r.score > tau for r in mine]  # type: ignore[operator]
    hits = sum(1 for r, d in zip(mine, rule, strict=True) if d and r.violating)
    return {
        "recall": hits / sum(r.violating for r in mine),
        "precision": hits / sum(rule),
        # Horvitz-Thompson standard error of the estimated count of the violating posts
        # that carry weights (released ones): sqrt(N (1 - r) / r); divided by the total.
        "se": math.sqrt(
            sum(r.violating and not r.dispatched for r in mine)
            * (1 - DESIGN[category][2])
            / DESIGN[category][2]
        )
        / sum(r.violating for r in mine),
    }


def assert_matches_hand(q: CategoryQuality, expected: dict[str, float | None]) -> None:
    for name, value in expected.items():
        got = getattr(q, name)
        assert (got is None) == (value is None), name
        if value is not None:
            assert got == pytest.approx(value, abs=1e-9), name


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return stream()


@pytest.fixture(scope="module")
def log(rows: list[Row], module_log: Location) -> Location:
    return write_log(module_log, rows)


def test_decisions_taken_equal_the_hand_computation(rows: list[Row], log: Location) -> None:
    with reading(log) as conn:
        result = estimate_quality(conn)
    assert list(result) == sorted(DESIGN)
    for category, q in result.items():
        assert q.tau is None
        assert_matches_hand(q, hand(rows, category))
        mine = [r for r in rows if r.category == category]
        assert q.n_decisions == N_POSTS
        assert q.n_dispatched_with_verdict == sum(r.dispatched for r in mine)
        assert q.n_audited_with_verdict == sum(r.audited for r in mine)
        assert q.n_violating_found_in_audit == sum(r.audited and r.violating for r in mine)
        assert q.estimated_misses == pytest.approx(
            q.n_violating_found_in_audit / DESIGN[category][2], abs=1e-9
        )
        assert (q.n_fallback_with_verdict, q.n_unexpected, q.few_audited) == (0, 0, False)


def test_decisions_taken_are_close_to_the_truth(rows: list[Row], log: Location) -> None:
    with reading(log) as conn:
        result = estimate_quality(conn)
    for category, q in result.items():
        true = truth(rows, category)
        assert q.recall is not None
        assert abs(q.recall - true["recall"]) <= 3 * true["se"], (q.recall, true)
        assert abs(q.recall - true["recall"]) <= 0.05
        # Every dispatched post comes back with w = 1: precision of the taken decisions is exact.
        assert q.precision == pytest.approx(true["precision"], abs=1e-12)
        assert q.recall < 1.0  # the audits found misses: not the 100 % a naive count says


@pytest.mark.parametrize("shift", [-0.15, 0.1])
def test_candidate_tau_equals_the_hand_computation_and_is_close_to_the_truth(
    rows: list[Row], log: Location, shift: float
) -> None:
    taus = {category: tau + shift for category, (_, tau, _) in DESIGN.items()}
    with reading(log) as conn:
        result = estimate_quality(conn, taus=taus)
    for category, q in result.items():
        assert q.tau == taus[category]
        assert_matches_hand(q, hand(rows, category, taus[category]))
        true = truth(rows, category, taus[category])
        assert q.recall is not None and q.precision is not None
        assert abs(q.recall - true["recall"]) <= 3 * true["se"], (q.recall, true)
        assert abs(q.precision - true["precision"]) <= 0.05, (q.precision, true)
    # A lower tau dispatches more: higher estimated recall than the decisions taken.
    with reading(log) as conn:
        taken = estimate_quality(conn)
    for category, q in result.items():
        assert (q.recall > taken[category].recall) == (shift < 0)  # type: ignore[operator]


def test_the_recall_interval_covers_the_truth_in_the_log(tmp_path: Path) -> None:
    """80 independent streams of 2,000 posts, 2 categories each, through the real log and
    query: the truth lies within [recall_low, recall_high] in at least 94 % of the cases (the
    normal interval recall ± 1.96 se managed 87.5-89.6 % at small counts). Every case has an
    interval, also one whose audits found no miss."""
    covered, cases = 0, 0
    for seed in range(80):
        rows = stream(seed=1000 + seed, n=2000)
        location = write_log(tmp_path / f"s{seed}.sqlite3", rows)
        with reading(location) as conn:
            result = estimate_quality(conn)
        for category, q in result.items():
            assert q.recall is not None and q.recall_low is not None and q.recall_high is not None
            assert q.recall_low <= q.recall <= q.recall_high
            covered += q.recall_low <= truth(rows, category)["recall"] <= q.recall_high
            cases += 1
    assert cases == 160
    assert covered / cases >= 0.94, (covered, cases)


@pytest.mark.parametrize(
    ("violating", "recall", "rate"),
    [(40, 0.9, 0.05), (200, 0.85, 0.01), (30, 0.7, 0.2), (1000, 0.9, 0.02)],
)
def test_the_recall_interval_covers_at_small_counts(violating: int, recall: float, rate: float):
    """4,000 seeded draws per design, few audited misses each (about 0.2 to 2 on average):
    the interval covers the true recall in at least 94 % of them."""
    rng = np.random.default_rng(14)
    hits = round(recall * violating)
    misses = violating - hits
    truth_recall = hits / violating
    seen = rng.binomial(misses, rate, size=4000)
    covered = 0
    for k in seen:
        low, high = recall_interval(float(hits), int(k), 1 / rate)
        covered += low <= truth_recall <= high
    assert covered / len(seen) >= 0.94, (violating, recall, rate, covered)


def test_a_category_missing_from_taus_is_judged_on_the_decisions_taken(log: Location) -> None:
    with reading(log) as conn:
        mixed = estimate_quality(conn, taus={"spam": 0.3})
        taken = estimate_quality(conn)
    assert mixed["spam"].tau == 0.3 and mixed["spam"] != taken["spam"]
    assert mixed["nudity"] == taken["nudity"]


def test_since_keeps_only_later_decisions(rows: list[Row], log: Location) -> None:
    since = T0 + N_POSTS // 2
    later = [r for r in rows if r.decided_at >= since]
    with reading(log) as conn:
        result = estimate_quality(conn, since=since, taus={"spam": 0.4})
        everything = estimate_quality(conn, taus={"spam": 0.4})
    for category, q in result.items():
        assert q.n_decisions == N_POSTS // 2
        assert_matches_hand(q, hand(later, category, q.tau))
        assert q != everything[category]


def test_fallback_and_unexpected_rows_are_left_out_and_counted(
    rows: list[Row], new_log: NewLog
) -> None:
    extra = [
        # Fallback: the model failed, the post went to every vertical; no score.
        Row("f1", "spam", None, True, False, 0.1, T0, True, True),
        Row("f2", "spam", None, True, False, 0.1, T0, False, True),
        # Released, not audited, and yet a verdict came back: no sampling design covers it.
        Row("u1", "spam", 0.2, False, False, 0.1, T0, True, True),
        # Audited at a rate of 0: no inclusion probability to invert.
        Row("u2", "spam", 0.2, False, True, 0.0, T0, True, True),
    ]
    with reading(write_log(new_log(), rows + extra)) as conn:
        result = estimate_quality(conn)
        candidate = estimate_quality(conn, taus={"spam": 0.1})
    spam = result["spam"]
    assert (spam.n_fallback_with_verdict, spam.n_unexpected) == (2, 2)
    assert spam.n_decisions == N_POSTS + 4
    assert_matches_hand(spam, hand(rows, "spam"))
    assert_matches_hand(candidate["spam"], hand(rows, "spam", 0.1))
    assert candidate["spam"].n_fallback_with_verdict == 2


def test_without_audited_verdicts_recall_is_unknown(rows: list[Row], new_log: NewLog) -> None:
    no_audits = [r for r in rows if not r.audited]
    with reading(write_log(new_log(), no_audits)) as conn:
        result = estimate_quality(conn)
        candidate = estimate_quality(conn, taus={"spam": 0.3, "nudity": 0.3})
    for q in (*result.values(), *candidate.values()):
        assert q.recall is None  # not 1.0: misses were never looked for
        assert q.few_audited and q.n_audited_with_verdict == 0
        assert q.precision is not None
    assert result["spam"].precision == pytest.approx(truth(rows, "spam")["precision"])


def test_few_audits_are_flagged(rows: list[Row], new_log: NewLog) -> None:
    # 100 posts: ~8 and ~17 audits
    with reading(write_log(new_log(), rows[:200])) as conn:
        result = estimate_quality(conn, min_audited=30)
    assert all(q.few_audited and q.n_audited_with_verdict > 0 for q in result.values())
    assert all(q.recall is not None for q in result.values())


def test_an_empty_log_gives_zero_counts(new_log: NewLog) -> None:
    with reading(write_log(new_log(), [])) as conn:
        assert estimate_quality(conn) == {}
        result = estimate_quality(conn, ["spam"], taus={"spam": 0.5})
    assert result["spam"] == CategoryQuality(
        "spam", 0.5, None, None, 0, 0, 0, 0, 0.0, 0.0, 0, 0, True, None
    )


def test_cli_prints_a_table_and_json(
    rows: list[Row], log: Location, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["quality", "--log", str(log)]) == 0  # a path or a URL
    text = capsys.readouterr().out
    assert "decisions taken" in text
    assert all(any(line.startswith(c) for line in text.splitlines()) for c in DESIGN)

    candidate = tmp_path / "candidate.yaml"
    taus = {"spam": 0.35, "nudity": 0.45}
    candidate.write_text(
        "version: cand-1\nmodel_version: m1\ncategories:\n"
        + "".join(f"  {c}:\n    tau: {t}\n" for c, t in taus.items())
    )
    assert main(["quality", "--log", str(log), "--thresholds", str(candidate)]) == 0
    assert "version cand-1" in capsys.readouterr().out

    assert main(["quality", "--log", str(log), "--thresholds", str(candidate), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidate"]["version"] == "cand-1"
    for category in DESIGN:
        taken, under = out["taken"][category], out["candidate"]["categories"][category]
        assert taken["recall"] == pytest.approx(hand(rows, category)["recall"], abs=1e-9)
        assert under["tau"] == taus[category]
        assert under["recall"] == pytest.approx(
            hand(rows, category, taus[category])["recall"], abs=1e-9
        )

    assert main(["quality", "--log", str(log), "--since-hours", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["taken"] == {}  # the stream is from 2023


def test_cli_on_an_empty_log_prints_zero_counts(
    new_log: NewLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = str(write_log(new_log(), []))
    candidate = tmp_path / "t.yaml"
    candidate.write_text("version: a\nmodel_version: m\ncategories:\n  spam:\n    tau: 0.5\n")
    assert main(["quality", "--log", empty]) == 0
    assert "no decisions" in capsys.readouterr().out
    argv = ["quality", "--log", empty, "--thresholds", str(candidate)]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["taken"]["spam"]["n_decisions"] == 0


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no decision log at"),
        ("not-sqlite", "not a readable decision log"),
        ("bad-thresholds", "thresholds refused (schema)"),
        ("missing-thresholds", "cannot read"),
        ("negative-since", "--since-hours must be > 0"),
    ],
)
def test_cli_errors_exit_2_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, message: str
) -> None:
    path = tmp_path / "log.sqlite3"
    argv = ["quality", "--log", str(path)]
    if setup == "not-sqlite":
        path.write_text("not a database, just text long enough to be looked at" * 20)
    elif setup != "missing":
        write_log(path, [])
    if setup == "bad-thresholds":
        (tmp_path / "t.yaml").write_text("version: a\ncategories: {}\n")
        argv += ["--thresholds", str(tmp_path / "t.yaml")]
    if setup == "missing-thresholds":
        argv += ["--thresholds", str(tmp_path / "absent.yaml")]
    if setup == "negative-since":
        argv += ["--since-hours", "-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("radar quality: ") and message in err
    assert "Traceback" not in err


def test_cli_defaults_to_the_log_the_service_is_configured_with(
    rows: list[Row],
    log: Location,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A URL from the environment keeps its password out of the process list.
    name = "RADAR_DECISION_LOG_PATH" if isinstance(log, Path) else "RADAR_DECISION_LOG_URL"
    monkeypatch.setenv(name, str(log))
    assert main(["quality", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["taken"]["spam"]["recall"] == pytest.approx(hand(rows, "spam")["recall"], abs=1e-9)


def test_cli_on_an_unreachable_database_exits_2_and_never_prints_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"postgresql://radar:hunter2@127.0.0.1:{sock.getsockname()[1]}/radar"
        assert main(["quality", "--log", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("radar quality: ") and "not a readable decision log" in err
    assert "hunter2" not in err and "radar:***@127.0.0.1" in err
    assert "Traceback" not in err

    assert main(["quality", "--log", "mysql://radar@db/radar"]) == 2
    assert "--log: unsupported database 'mysql'" in capsys.readouterr().err
