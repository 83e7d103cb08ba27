"""The real-PostgreSQL fixtures of tests/postgres.py: a database per test, distinct and usable
through SQLAlchemy + psycopg 3; a server that never runs as root and leaves nothing behind."""

import os
import pwd
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, inspect, select
from sqlalchemy.engine import make_url

from tests.postgres import PostgresServer, PostgresStartError

metadata = MetaData()
things = Table(
    "things",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("label", String(40), nullable=False),
)


def test_round_trip(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        assert inspect(engine).get_table_names() == []  # a fresh, empty database
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(things.insert(), [{"label": "spam"}, {"label": "ham"}])
        with engine.connect() as conn:
            rows = conn.execute(select(things.c.label).order_by(things.c.id)).scalars().all()
            assert rows == ["spam", "ham"]
            assert conn.dialect.name == "postgresql"
            assert conn.dialect.driver == "psycopg"
    finally:
        engine.dispose()


def test_databases_are_distinct(postgres_server: PostgresServer) -> None:
    first, second = postgres_server.create_database(), postgres_server.create_database()
    assert make_url(first).database != make_url(second).database
    engines = [create_engine(url) for url in (first, second)]
    try:
        metadata.create_all(engines[0])
        assert inspect(engines[0]).has_table("things")
        assert not inspect(engines[1]).has_table("things")
    finally:
        for engine in engines:
            engine.dispose()
        for url in (first, second):
            postgres_server.drop_database(url)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_server_never_runs_as_root(postgres_server: PostgresServer) -> None:
    # As root the server must run as the postgres user (it refuses root); otherwise as us.
    expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert Path(f"/proc/{postgres_server.pid}").stat().st_uid == expected
    assert postgres_server.data_dir.stat().st_uid == expected


def test_stop_leaves_nothing_behind() -> None:
    with PostgresServer() as server:
        pid, root = server.pid, server.root
        assert root is not None and root.is_dir()
    assert not Path(f"/proc/{pid}").exists()
    assert not root.exists()


def test_failed_start_leaves_nothing_behind(postgres_server: PostgresServer) -> None:
    # (Depends on `postgres_server` only to skip where PostgreSQL cannot run at all.)
    server = PostgresServer(settings={"shared_buffers": "not-a-size"})
    with pytest.raises(PostgresStartError, match=r"(?s)exited with code .*shared_buffers"):
        server.start()
    assert server.process is None
    assert server.root is None
