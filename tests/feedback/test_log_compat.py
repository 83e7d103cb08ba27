"""A decision log written by the previous release (tables made by hand-written SQLite DDL, the
service's writer on `sqlite3`) opens unchanged: old rows are kept and join new verdicts."""

import sqlite3
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from app.feedback.log import DecisionLog, DecisionRecord, Verdict
from app.feedback.quality import estimate_quality
from app.feedback.schema import decisions, log_url
from tests.logs import reading

# app/feedback/schema.py as it was before the log moved onto SQLAlchemy.
PREVIOUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    post_id TEXT NOT NULL, category TEXT NOT NULL, score REAL, dispatched INTEGER NOT NULL,
    audited INTEGER NOT NULL, audit_rate REAL NOT NULL, thresholds_version TEXT,
    model_version TEXT NOT NULL, decided_at REAL NOT NULL, PRIMARY KEY (post_id, category)
);
CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (decided_at);
CREATE TABLE IF NOT EXISTS feedback (
    post_id TEXT NOT NULL, category TEXT NOT NULL, violating INTEGER NOT NULL,
    received_at REAL NOT NULL, PRIMARY KEY (post_id, category)
);
CREATE INDEX IF NOT EXISTS feedback_by_time ON feedback (received_at);
"""


def test_a_log_of_the_previous_release_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "decision_log.sqlite3"
    now = time.time()
    with sqlite3.connect(path) as conn:
        conn.executescript(PREVIOUS_SCHEMA)
        conn.execute(
            "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old", "spam", 0.2, 0, 1, 0.5, "t0", "m0", now - 60),
        )
        conn.execute("INSERT INTO feedback VALUES ('old', 'spam', 1, ?)", (now - 30,))
    conn.close()

    log = DecisionLog(path, retention_s=86400, max_rows=1000)
    log.start()
    try:
        log.record([DecisionRecord("new", "spam", 0.9, True, False, 0.5, "t1", "m1", now)])
        assert log.add_feedback([Verdict("new", "spam", True)]) == 1
    finally:
        log.stop()
    with reading(path) as conn:
        spam = estimate_quality(conn)["spam"]
    # The old audited miss (weight 1 / 0.5) and the new dispatched hit (weight 1).
    assert (spam.n_decisions, spam.n_audited_with_verdict, spam.n_dispatched_with_verdict) == (
        2,
        1,
        1,
    )
    assert spam.recall == 1 / 3


def test_decision_records_are_in_the_tables_column_order() -> None:
    """The writer hands each record to the driver as a tuple in the table's column order."""
    assert DecisionRecord._fields == tuple(c.name for c in decisions.columns)


def test_a_log_without_the_unanswered_column_gains_it(new_log) -> None:
    """Logs created before `decisions.unanswered` (issue 14, item 6), on either backend: the
    column is added at start-up, old rows read as answered, new rows carry their reason."""
    location = new_log()
    now = time.time()
    engine = create_engine(log_url(location))
    with engine.begin() as conn:
        for statement in filter(str.strip, PREVIOUS_SCHEMA.split(";")):
            conn.execute(text(statement))
        old = "INSERT INTO decisions VALUES ('old', 'spam', 0.2, 0, 0, 0.5, 't0', 'm0', :t)"
        conn.execute(text(old), {"t": now - 60})
    engine.dispose()
    log = DecisionLog(location, retention_s=86400, max_rows=1000)
    log.start()
    try:
        log.record(
            [DecisionRecord("late", "spam", 0.9, True, False, 0.5, "t1", "m1", now, "deadline")]
        )
        log.flush()
    finally:
        log.stop()
    with reading(location) as conn:
        found = conn.execute(text("SELECT post_id, unanswered FROM decisions ORDER BY post_id"))
        assert [tuple(row) for row in found] == [("late", "deadline"), ("old", None)]
