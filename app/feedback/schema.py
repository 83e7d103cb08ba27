"""The decision log's tables, and how to open them: an SQLite file (the default, one per
replica) or a PostgreSQL database shared by every replica (`RADAR_DECISION_LOG_URL`).

One row per (post, category): what the router decided and why, and, once a vertical has
judged the post, its verdict. A re-routed post (a retry) replaces its rows.

Both backends are reached through SQLAlchemy Core with the same tables and the same SQL
(upserts are `INSERT ... ON CONFLICT`, which SQLite >= 3.24 and PostgreSQL both speak). The
flags stay integers (0/1) rather than booleans so that files written by earlier releases,
whose tables were created by hand-written SQLite DDL of the same shape, open unchanged.
"""

import sqlite3
from pathlib import Path

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

metadata = MetaData()

decisions = Table(
    "decisions",
    metadata,
    Column("post_id", Text, nullable=False),
    Column("category", Text, nullable=False),
    Column("score", Float),  # p for the category; NULL for a fallback decision
    Column("dispatched", Integer, nullable=False),  # 1: the router sent the post to the vertical
    Column("audited", Integer, nullable=False),  # 1: released, but sampled for audit (sent)
    Column("audit_rate", Float, nullable=False),  # the category's audit rate when decided
    Column("thresholds_version", Text),
    Column("model_version", Text, nullable=False),
    Column("decided_at", Float, nullable=False),  # Unix seconds
    # NULL: the caller got this decision. Else why it never did, the model having computed it
    # (`deadline`: answered 504; `client_gone`; `error`): nothing acted on it, a retry of the
    # post replaces it. Added after the first release: `create_tables` adds it to old logs.
    Column("unanswered", Text),
    PrimaryKeyConstraint("post_id", "category"),
    Index("decisions_by_time", "decided_at"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("post_id", Text, nullable=False),
    Column("category", Text, nullable=False),
    Column("violating", Integer, nullable=False),  # the vertical's verdict: 1 violating, 0 not
    Column("received_at", Float, nullable=False),
    PrimaryKeyConstraint("post_id", "category"),
    Index("feedback_by_time", "received_at"),
)

BACKENDS = ("sqlite", "postgresql")

# Any fixed number: replicas starting together take it while creating the tables, so that two
# `CREATE TABLE`s of the same name do not race (PostgreSQL would fail one of them).
_SCHEMA_LOCK_KEY = 0x52414441  # "RADA"


class LogLocationError(ValueError):
    """A decision-log location that is neither a path nor a supported database URL."""


def is_database_url(location: str | Path) -> bool:
    """A log location with '://' is a database URL (`postgresql://user:pw@host/db`,
    `sqlite:///x`); anything else is the path of an SQLite file."""
    return isinstance(location, str) and "://" in location


def log_url(location: str | Path) -> URL:
    """The SQLAlchemy URL of a log location (`is_database_url`)."""
    if not is_database_url(location):
        return URL.create("sqlite+pysqlite", database=str(location))
    try:
        url = make_url(location)
    except ArgumentError as exc:
        raise LogLocationError(f"not a database URL: {exc}") from exc
    if url.get_backend_name() not in BACKENDS:
        raise LogLocationError(
            f"unsupported database {url.get_backend_name()!r}: use one of {', '.join(BACKENDS)}"
        )
    if url.get_backend_name() == "postgresql" and url.get_driver_name() != "psycopg":
        url = url.set(drivername="postgresql+psycopg")  # the driver we install (psycopg 3)
    return url


def describe(location: str | Path) -> str:
    """A log location for logs and messages: a file as its path, a URL never with its
    password. Raises LogLocationError as `log_url` does."""
    url = log_url(location)
    if not is_database_url(location):
        return str(location)
    return url.render_as_string(hide_password=True)


def driver_message(exc: Exception) -> str:
    """The database driver's own words (first line) for a SQLAlchemy error, not the wrapper's
    SQL, parameters and link."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_log(location: str | Path, *, readonly: bool = False) -> Engine:
    """An engine on the log; writers also create the tables. Raises SQLAlchemy's errors
    (OperationalError and kin) when the database cannot be reached or created."""
    url = log_url(location)
    if url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, readonly)
    else:
        options = {"options": "-c default_transaction_read_only=on"} if readonly else {}
        # pre_ping: a replica outlives database restarts; a dead pooled connection is
        # replaced before use instead of failing one flush.
        engine = create_engine(url, pool_pre_ping=True, connect_args=options)
    if not readonly:
        try:
            create_tables(engine)
        except Exception:
            engine.dispose()
            raise
    return engine


def create_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        metadata.create_all(conn, checkfirst=True)
        _add_new_columns(conn)


def _add_new_columns(conn: Connection) -> None:
    """Columns the tables gained since a log was created, added to it (nullable, so old
    rows read as they meant). A writer of the previous release names its columns in its
    INSERT, so it goes on writing into the wider table during a rolling upgrade."""
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:  # a NOT NULL column cannot be added to rows that exist
                raise RuntimeError(f"cannot add NOT NULL column {table.name}.{column.name}")
            kind = column.type.compile(dialect=conn.dialect)
            # Only the schema's own identifiers and types are formatted in.
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))


def _sqlite_engine(url: URL, readonly: bool) -> Engine:
    path = Path(url.database or "")
    if readonly:
        # mode=ro: a reader never creates the file or takes a write lock.
        ro = URL.create(
            "sqlite+pysqlite", database=f"file:{path}", query={"mode": "ro", "uri": "true"}
        )
        return create_engine(ro, connect_args={"timeout": 10})
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _durable(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        # WAL: readers never block the writer. FULL: a committed transaction survives a power
        # cut, not only a process crash; writes are batched, so it costs one fsync per batch.
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=FULL")

    return engine
