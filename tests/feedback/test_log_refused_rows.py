"""A row the database refuses never stops the decision log (issue 13, item 5).

Before: one refused row failed the flush of the whole buffer, which was retried forever, so
nothing more was logged. Now the refused rows are set aside and counted, and every other row
of the batch, and every later batch, is written. A real PostgreSQL refuses a NUL in text; an
SQLite log refuses a NULL in a NOT NULL column.
"""

import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from app.feedback.log import DecisionLog, DecisionRecord
from tests.logs import rows


def record(post_id: str, model_version: str | None = "m1") -> DecisionRecord:
    return DecisionRecord(post_id, "spam", 0.5, True, False, 0.0, "v1", model_version, time.time())  # type: ignore[arg-type]


def open_log(location: str | Path) -> DecisionLog:
    log = DecisionLog(location, retention_s=86400, max_rows=10_000, flush_interval_s=3600)
    log.start()
    return log


def check_refused_rows_are_set_aside(log: DecisionLog, url: str, bad: list[DecisionRecord]):
    good = [record(f"p{i:03d}") for i in range(200)]
    batch = good[:77] + bad[:1] + good[77:150] + bad[1:] + good[150:]
    log.record(batch)
    log.flush()
    assert log.counts.rejected_rows == len(bad)
    assert [r[0] for r in rows(url, "SELECT post_id FROM decisions ORDER BY post_id")] == [
        r.post_id for r in good
    ]
    # The log goes on: the next batch is written in full, and nothing waits in the buffer.
    log.record([record("later")])
    log.flush()
    assert rows(url, "SELECT post_id FROM decisions WHERE post_id = 'later'") == [("later",)]
    assert not log._pending


def test_sqlite_refused_rows_are_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    log = open_log(path)
    try:
        bad = [record("no-model-1", model_version=None), record("no-model-2", None)]
        check_refused_rows_are_set_aside(log, f"sqlite:///{path}", bad)
    finally:
        log.stop()


def test_postgres_refuses_a_nul_and_only_that_row_is_set_aside(postgres_url: str) -> None:
    log = open_log(postgres_url)
    try:
        check_refused_rows_are_set_aside(log, postgres_url, [record("nul\x00id"), record("a\x00")])
    finally:
        log.stop()


def test_an_outage_while_isolating_keeps_the_unwritten_rows(tmp_path: Path, monkeypatch) -> None:
    """The database goes away between the halves: nothing unwritten is lost or reordered."""
    path = tmp_path / "log.db"
    log = open_log(path)
    try:
        batch = [record(f"p{i}") for i in range(8)] + [record("bad", None)]
        real_write = log._write
        calls = {"n": 0}

        def failing_after_two(part):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OperationalError("INSERT", {}, Exception("database is gone"))
            return real_write(part)

        monkeypatch.setattr(log, "_write", failing_after_two)
        log.record(batch)
        with pytest.raises(OperationalError):
            log.flush()
        monkeypatch.setattr(log, "_write", real_write)
        log.flush()  # the database is back
        written = {r[0] for r in rows(f"sqlite:///{path}", "SELECT post_id FROM decisions")}
        assert written == {f"p{i}" for i in range(8)}
        assert log.counts.rejected_rows == 1 and not log._pending
    finally:
        log.stop()
