"""The decision log's tables (SQLite), shared by the service that writes them and the tools
that read them (`radar quality`).

One row per (post, category): what the router decided and why, and, once a vertical has
judged the post, its verdict. A re-routed post (a retry) replaces its rows.
"""

import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    post_id TEXT NOT NULL,
    category TEXT NOT NULL,
    score REAL,                     -- p for the category; NULL for a fallback decision
    dispatched INTEGER NOT NULL,    -- 1: the router sent the post to the vertical
    audited INTEGER NOT NULL,       -- 1: released, but sampled for audit (sent anyway)
    audit_rate REAL NOT NULL,       -- the category's audit rate when decided
    thresholds_version TEXT,
    model_version TEXT NOT NULL,
    decided_at REAL NOT NULL,       -- Unix seconds
    PRIMARY KEY (post_id, category)
);
CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (decided_at);
CREATE TABLE IF NOT EXISTS feedback (
    post_id TEXT NOT NULL,
    category TEXT NOT NULL,
    violating INTEGER NOT NULL,     -- the vertical's verdict: 1 violating, 0 not
    received_at REAL NOT NULL,
    PRIMARY KEY (post_id, category)
);
CREATE INDEX IF NOT EXISTS feedback_by_time ON feedback (received_at);
"""


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    """Open (and, for writers, create) the log; WAL so readers never block the writer."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives a power cut, not only a process crash;
        # writes are batched, so it costs one fsync per batch.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
    return conn
