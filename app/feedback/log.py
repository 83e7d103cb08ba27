"""The service's decision log: every routed post's per-category decision, and the verticals'
verdicts joined to them (SQLite, `app/feedback/schema.py`).

No request waits for the disk: `record` appends to an in-memory buffer that one writer
thread flushes in a single transaction every `flush_interval_s`. A full buffer drops the
oldest records and counts them (`radar_decision_log_dropped_total`) rather than slow routing.
Verdicts are the opposite: `add_feedback` commits before it returns, so a verdict the
service acknowledged survives a crash or restart. Old rows are pruned by age and count.
"""

import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter

from app.feedback.schema import connect

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0


class DecisionLogError(RuntimeError):
    """The decision log cannot be opened or written."""


class DecisionRecord(NamedTuple):
    """One (post, category) decision, as the `decisions` table stores it: a tuple already,
    so the writer hands it to SQLite as it is (no per-row conversion on the hot path)."""

    post_id: str
    category: str
    score: float | None
    dispatched: bool
    audited: bool
    audit_rate: float
    thresholds_version: str | None
    model_version: str
    decided_at: float


@dataclass(frozen=True)
class Verdict:
    post_id: str
    category: str
    violating: bool


class DecisionLog:
    """Buffered writer of decisions, synchronous writer of verdicts, one SQLite file."""

    def __init__(
        self,
        path: Path,
        registry: CollectorRegistry,
        *,
        retention_s: float,
        max_rows: int,
        flush_interval_s: float = 0.5,
        max_pending: int = 200_000,
    ) -> None:
        self.path = path
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.flush_interval_s = flush_interval_s
        self._pending: collections.deque[DecisionRecord] = collections.deque(maxlen=max_pending)
        self._db_lock = threading.Lock()  # one connection, used by the writer and verdicts
        self._wake = threading.Event()
        self._stopping = False
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self.dropped = Counter(
            "radar_decision_log_dropped",
            "Decisions not logged because the writer fell behind.",
            registry=registry,
        )
        self.verdicts = Counter(
            "radar_feedback_verdicts",
            "Verdicts received; joined: a logged decision exists for the post and category.",
            ["joined"],
            registry=registry,
        )
        for joined in ("true", "false"):
            self.verdicts.labels(joined)

    def start(self) -> None:
        try:
            self._conn = connect(self.path)
        except (sqlite3.Error, OSError) as exc:
            raise DecisionLogError(f"cannot open the decision log {self.path}: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="radar-decision-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush what is buffered, then close."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._conn is not None:
            with self._db_lock:
                self._conn.close()
            self._conn = None

    def record(self, records: Sequence[DecisionRecord]) -> None:
        """Buffer decisions for the writer; never blocks."""
        overflow = len(self._pending) + len(records) - (self._pending.maxlen or 0)
        if overflow > 0:
            self.dropped.inc(overflow)
        self._pending.extend(records)

    def add_feedback(self, verdicts: Sequence[Verdict]) -> int:
        """Store verdicts (a repeated one replaces the earlier); committed on return. Returns
        how many join a logged decision."""
        if self._conn is None:
            raise DecisionLogError("the decision log is not open")
        self.flush()  # so that a verdict on a just-routed post finds its decision
        now = time.time()
        rows = [(v.post_id, v.category, int(v.violating), now) for v in verdicts]
        keys = [(v.post_id, v.category) for v in verdicts]
        with self._db_lock, self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?)", rows)
            joined = sum(
                self._conn.execute(
                    "SELECT 1 FROM decisions WHERE post_id = ? AND category = ?", key
                ).fetchone()
                is not None
                for key in keys
            )
        self.verdicts.labels(joined="true").inc(joined)
        self.verdicts.labels(joined="false").inc(len(verdicts) - joined)
        return joined

    def flush(self) -> None:
        """Write everything buffered now (the writer thread calls this; tests may too)."""
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        if not batch or self._conn is None:
            return
        try:
            with self._db_lock, self._conn:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    batch,
                )
        except sqlite3.Error:
            self._pending.extendleft(reversed(batch))  # retried at the next flush
            raise

    def prune(self, now: float | None = None) -> None:
        """Drop decisions and verdicts older than the retention, then the oldest decisions
        beyond `max_rows`."""
        if self._conn is None:
            return
        cutoff = (now or time.time()) - self.retention_s
        with self._db_lock, self._conn:
            self._conn.execute("DELETE FROM decisions WHERE decided_at < ?", (cutoff,))
            self._conn.execute("DELETE FROM feedback WHERE received_at < ?", (cutoff,))
            self._conn.execute(
                "DELETE FROM decisions WHERE rowid IN (SELECT rowid FROM decisions "
                "ORDER BY decided_at DESC LIMIT -1 OFFSET ?)",
                (self.max_rows,),
            )

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
                if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                    self._last_prune = time.monotonic()
                    self.prune()
            except sqlite3.Error:  # the writer must outlive a full disk or a locked file
                log.exception("decision log write failed; will retry")
            if self._stopping and not self._pending:
                return
