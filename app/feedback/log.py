"""The service's decision log: every routed post's per-category decision, and the verticals'
verdicts joined to them (an SQLite file or a shared PostgreSQL database,
`app/feedback/schema.py`).

Routing does not wait for the database: `record` appends to an in-memory buffer that one
writer thread flushes in a single transaction every `flush_interval_s`. The exception is an
audited post (a few percent of traffic): `record_now` writes its rows before the answer
leaves, so its verdict finds its decision even after a crash that loses the buffer. A full
buffer drops the oldest records and counts them (`radar_decision_log_dropped_total`) rather
than slow routing.
Verdicts are the opposite: `add_feedback` commits before it returns, so a verdict the
service acknowledged survives a crash or restart. Old rows are pruned by age and count.

Several replicas may share one PostgreSQL log: a verdict then joins the decision whichever
replica made it. Each replica flushes its rows sorted by key, so two replicas upserting the
same posts (a retry routed elsewhere) lock rows in the same order and cannot deadlock; pruning
takes an advisory lock, so only one replica prunes at a time.
"""

import collections
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import Connection, Engine, Integer, Table, text
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from app.feedback.schema import decisions, describe, driver_message, feedback, open_log

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0
# Keys per query when joining verdicts to decisions, two bound parameters each: under the 999
# that SQLite builds before 3.32 allow (newer ones and PostgreSQL allow far more).
JOIN_CHUNK = 450
_PRUNE_LOCK_KEY = 0x52414442  # any fixed number, shared by the replicas


class DecisionLogError(RuntimeError):
    """The decision log cannot be opened or written."""


class DecisionRecord(NamedTuple):
    """One (post, category) decision, as the `decisions` table stores it, in its column order
    (the writer hands the tuples to the driver as they are)."""

    post_id: str
    category: str
    score: float | None
    dispatched: bool
    audited: bool
    audit_rate: float
    thresholds_version: str | None
    model_version: str
    decided_at: float
    unanswered: str | None = None  # why the caller never got it (504 ...); None: answered


@dataclass(frozen=True)
class Verdict:
    post_id: str
    category: str
    violating: bool


@dataclass
class LogCounts:
    """What the log did, as running totals (the service exports them as counters).

    Plain counts and no Prometheus objects here: the feedback layer knows nothing of how
    the service exposes it; `app.service.metrics` reads these at every scrape.
    """

    write_failures: int = 0  # flushes that failed (retried; the decisions stay buffered)
    dropped: int = 0  # decisions not logged: the writer fell behind
    rejected_rows: int = 0  # rows the database refused, set aside
    audited_written: int = 0  # rows of audited posts written before their answer left
    verdicts_joined: int = 0  # verdicts that found their logged decision
    verdicts_unjoined: int = 0  # verdicts with no logged decision for the post and category
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **increments: int) -> None:
        """Add to some counts at once (the flushing thread and the loop both count)."""
        with self._lock:
            for name, n in increments.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}


class DecisionLog:
    """Buffered writer of decisions, synchronous writer of verdicts, one database."""

    def __init__(
        self,
        location: Path | str,
        *,
        retention_s: float,
        max_rows: int,
        flush_interval_s: float = 0.5,
        max_pending: int = 200_000,
    ) -> None:
        self.location = location  # a path (SQLite) or a database URL
        self.where = describe(location)  # for messages: no password
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.flush_interval_s = flush_interval_s
        self._pending: collections.deque[DecisionRecord] = collections.deque(maxlen=max_pending)
        # One writer at a time in this process (the flushing thread, verdicts, pruning):
        # SQLite has a single write lock anyway, and waiting here is cheaper than its retries.
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._engine: Engine | None = None
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self._failing = False
        self.counts = LogCounts()  # read by the service's metrics at each scrape

    @property
    def engine(self) -> Engine:
        """The open log's engine (readers such as the quality gauges use it too)."""
        if self._engine is None:
            raise DecisionLogError("the decision log is not open")
        return self._engine

    def start(self) -> None:
        try:
            self._engine = open_log(self.location)
        except (SQLAlchemyError, OSError) as exc:
            raise DecisionLogError(
                f"cannot open the decision log {self.where}: {driver_message(exc)}"
            ) from exc
        self._thread = threading.Thread(target=self._run, name="radar-decision-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Flush what is buffered, then close."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._engine is not None:
            with self._write_lock:
                self._engine.dispose()
            self._engine = None

    def record(self, records: Sequence[DecisionRecord]) -> None:
        """Buffer decisions for the writer; never blocks."""
        overflow = len(self._pending) + len(records) - (self._pending.maxlen or 0)
        if overflow > 0:
            self.counts.add(dropped=overflow)
        self._pending.extend(records)

    def record_now(self, records: Sequence[DecisionRecord]) -> bool:
        """Write `records` before returning (audited decisions: their verdict will come back
        and must find them, even after a kill -9 that loses the buffer). False when the
        database refused or was unreachable: the records are buffered like any others then,
        and written by the next flush that can."""
        rows = sorted(records, key=lambda r: (r.post_id, r.category))
        try:
            self._write(rows)
        except (SQLAlchemyError, DecisionLogError):
            self.record(records)
            return False
        self.counts.add(audited_written=len(rows))
        return True

    def add_feedback(self, verdicts: Sequence[Verdict]) -> int:
        """Store verdicts (a repeated one replaces the earlier); committed on return. Returns
        how many join a logged decision."""
        engine = self.engine
        try:
            self.flush()  # so that a verdict on a just-routed post finds its decision
        except SQLAlchemyError as exc:
            raise DecisionLogError(f"verdicts not stored: {driver_message(exc)}") from exc
        now = time.time()
        # Sorted by key: the same lock order as every other writer of the shared log (stable: of
        # two verdicts on one key, the later wins). Tuples in the `feedback` table's order.
        rows = sorted(
            ((v.post_id, v.category, v.violating, now) for v in verdicts), key=lambda r: r[:2]
        )
        keys = {(v.post_id, v.category) for v in verdicts}
        try:
            with self._write_lock, engine.begin() as conn:
                if rows:
                    conn.exec_driver_sql(_upsert_sql(feedback, conn.dialect.paramstyle), rows)
                logged = _logged_keys(conn, keys)
        except SQLAlchemyError as exc:
            raise DecisionLogError(f"verdicts not stored: {driver_message(exc)}") from exc
        joined = sum((v.post_id, v.category) in logged for v in verdicts)
        self.counts.add(verdicts_joined=joined, verdicts_unjoined=len(verdicts) - joined)
        return joined

    def flush(self) -> None:
        """Write everything buffered now (the writer thread calls this; tests may too)."""
        batch = []
        # Pop until empty, not `while self._pending`: the writer thread and a verdict's
        # flush drain the same deque, and the other may take the last row between the
        # check and the pop (an IndexError that failed a verdict request).
        while True:
            try:
                batch.append(self._pending.popleft())
            except IndexError:
                break
        if not batch or self._engine is None:
            return
        # A stable sort: of two records for one key (a retry in the same batch), the later
        # is written last and wins, as it did in the buffer.
        rows = sorted(batch, key=lambda r: (r.post_id, r.category))
        # A row the database refuses (a NUL in text on PostgreSQL, a NULL where none may be)
        # fails its whole transaction, and retried forever it would stop the log for good: the
        # batch is halved until the refused rows stand alone, and those are set aside and
        # counted. Any other failure (the database down, the disk full) keeps every row not
        # yet written buffered, in order, for the next flush.
        parts = [rows]
        while parts:
            part = parts.pop()
            try:
                self._write(part)
            except (DataError, IntegrityError) as exc:
                if len(part) > 1:
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]  # the first half next
                    continue
                self.counts.add(rejected_rows=1)
                log.error(
                    "decision log %s: row refused, set aside: post %r, category %r: %s",
                    self.where,
                    part[0].post_id,
                    part[0].category,
                    driver_message(exc),
                )
            except SQLAlchemyError:
                unwritten = part + [row for rest in reversed(parts) for row in rest]
                self._pending.extendleft(reversed(unwritten))  # retried at the next flush
                raise

    def _write(self, rows: Sequence[DecisionRecord]) -> None:
        """Upsert `rows` (sorted by key) in one transaction."""
        if self._engine is None:
            raise DecisionLogError("the decision log is not open")
        with self._write_lock, self._engine.begin() as conn:
            # The records go to the driver as the tuples they are: SQLAlchemy's per-row
            # parameter processing would cost 3-4x the CPU, on the service's GIL.
            conn.exec_driver_sql(_upsert_sql(decisions, conn.dialect.paramstyle), list(rows))

    def prune(self, now: float | None = None) -> None:
        """Drop decisions and verdicts older than the retention, then the oldest decisions
        beyond `max_rows` (ties at the cut go too)."""
        if self._engine is None:
            return
        cutoff = (now or time.time()) - self.retention_s
        with self._write_lock, self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                lock = text("SELECT pg_try_advisory_xact_lock(:key)")
                if not conn.execute(lock, {"key": _PRUNE_LOCK_KEY}).scalar():
                    return  # another replica is pruning the shared log right now
            conn.execute(text("DELETE FROM decisions WHERE decided_at < :t"), {"t": cutoff})
            conn.execute(text("DELETE FROM feedback WHERE received_at < :t"), {"t": cutoff})
            # The newest row beyond the cap, found through the time index; all at or before
            # its time go.
            beyond = conn.execute(
                text(
                    "SELECT decided_at FROM decisions ORDER BY decided_at DESC LIMIT 1 OFFSET :cap"
                ),
                {"cap": self.max_rows},
            ).scalar()
            if beyond is not None:
                conn.execute(text("DELETE FROM decisions WHERE decided_at <= :t"), {"t": beyond})

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
                if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                    self._last_prune = time.monotonic()
                    self.prune()
            except SQLAlchemyError as exc:  # the writer outlives a full disk or a lost database
                self.counts.add(write_failures=1)
                if not self._failing:  # once per outage, not every flush interval
                    problem = driver_message(exc)
                    log.error("decision log %s: write failed, buffering: %s", self.where, problem)
                self._failing = True
                if self._stopping:  # nowhere to write what is left: count it as dropped
                    self.counts.add(dropped=len(self._pending))
                    return
            else:
                if self._failing:
                    log.info("decision log %s: writes recovered", self.where)
                self._failing = False
            if self._stopping and not self._pending:
                return


def _logged_keys(conn: Connection, keys: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Those of `keys` (post_id, category) that have a logged decision.

    The keys are a table joined to `decisions`, so each is one probe of its primary key on
    both backends. (A row-value `IN (...)` list makes SQLite scan the whole index instead: a
    10,000-verdict request took seconds on a log of millions of rows.)"""
    found: set[tuple[str, str]] = set()
    ordered = sorted(keys)
    for start in range(0, len(ordered), JOIN_CHUNK):
        chunk = ordered[start : start + JOIN_CHUNK]
        rows = ", ".join(f"(:p{i}, :c{i})" for i in range(len(chunk)))
        query = text(
            f"WITH v(p, c) AS (VALUES {rows}) SELECT d.post_id, d.category "  # noqa: S608
            "FROM v JOIN decisions d ON d.post_id = v.p AND d.category = v.c"
        )  # only placeholders are formatted in; the keys are bound
        params: dict[str, str] = {}
        for i, (post_id, category) in enumerate(chunk):
            params[f"p{i}"], params[f"c{i}"] = post_id, category
        found.update((row[0], row[1]) for row in conn.execute(query, params))
    return found


@functools.cache
def _upsert_sql(table: Table, paramstyle: str) -> str:
    """INSERT that replaces the row of the same key (a retried post's decision, a repeated
    verdict), for tuples in the table's column order, in the driver's own placeholders;
    `ON CONFLICT DO UPDATE` in both SQLite and PostgreSQL. The 0/1 flags arrive as Python
    bools: CAST, because PostgreSQL will not put a boolean in an integer column by itself."""
    mark = "?" if paramstyle == "qmark" else "%s"
    names = [c.name for c in table.columns]
    values = ", ".join(
        f"CAST({mark} AS INTEGER)" if isinstance(c.type, Integer) else mark for c in table.columns
    )
    key = [c.name for c in table.primary_key]
    replaced = ", ".join(f"{name} = excluded.{name}" for name in names if name not in key)
    # Only the schema's own identifiers are formatted in; the values are bound.
    return (
        f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({values}) "  # noqa: S608
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {replaced}"
    )
