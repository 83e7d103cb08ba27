"""Decision logs on both backends for the tests: an SQLite file, or a fresh database on the
real PostgreSQL server of `tests/postgres.py` (skipped, with the reason, where none can start;
a failure instead under RADAR_REQUIRE_POSTGRES=1).

The fixtures are registered for the whole suite (`pytest_plugins` in tests/conftest.py); every
test using `log_backend`, `new_log` or `module_log` runs once per backend.
"""

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Connection, text

from app.feedback.schema import open_log

Location = Path | str  # an SQLite path or a database URL, as DecisionLog takes them
BACKENDS = ("sqlite", "postgresql")
_serial = itertools.count()


@pytest.fixture(scope="module", params=BACKENDS)
def log_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_log(backend: str, request: pytest.FixtureRequest, folder: Path) -> Location:
    """A new, empty log location on `backend` (nothing created yet for SQLite)."""
    if backend == "postgresql":
        server = request.getfixturevalue("postgres_server")
        url = str(server.create_database())
        request.addfinalizer(lambda: server.drop_database(url))  # ~7 MB each otherwise
        return url
    return folder / f"log-{next(_serial)}.sqlite3"


@pytest.fixture(scope="module")
def module_log(
    log_backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Location:
    """A new, empty log on this module's backend, kept for the whole module: for a stream
    written once and read by many tests."""
    return make_log(log_backend, request, tmp_path_factory.mktemp("log"))


@pytest.fixture
def new_log(
    log_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], Location]:
    """A factory of new, empty logs on this module's backend."""
    return lambda: make_log(log_backend, request, tmp_path)


@contextmanager
def reading(location: Location) -> Iterator[Connection]:
    """A read-only connection of our own: what another process (or a restart) would see."""
    engine = open_log(location, readonly=True)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def log_settings(location: Location) -> dict[str, object]:
    """The service settings that put its decision log at `location`."""
    if isinstance(location, Path):
        return {"decision_log_path": location}
    return {"decision_log_url": location}


def rows(location: Location, sql: str) -> list[tuple]:
    with reading(location) as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


def draw_decision(
    rng: np.random.Generator, prevalence: float, tau: float, audit_rate: float
) -> tuple[bool, float, bool, bool]:
    """One synthetic decision (violating, score, dispatched, audited): violating with
    probability `prevalence`, a score correlated with it (Beta(5,2) if violating, Beta(2,5)
    if not), dispatched iff score > tau, and a released post audited with `audit_rate`."""
    violating = bool(rng.random() < prevalence)
    score = float(rng.beta(5, 2) if violating else rng.beta(2, 5))
    dispatched = score > tau
    audited = not dispatched and bool(rng.random() < audit_rate)
    return violating, score, dispatched, audited
