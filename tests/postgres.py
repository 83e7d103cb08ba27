"""A real, throwaway PostgreSQL server for tests: `PostgresServer` and its pytest fixtures.

The decision log runs on PostgreSQL in production, and SQLite hides what matters there
(concurrent writers, `ON CONFLICT`, types, transactions), so its tests talk to a real server:
Debian's `postgresql` binaries (scripts/install_system_deps.sh), started here from a fresh
`initdb` in a temporary directory. Nothing of the package's own cluster or service is used.

`postgres_server` (session) starts one server for the whole run; `postgres_url` (function)
hands each test its own empty database on it. Without PostgreSQL they skip, naming what is
missing, unless RADAR_REQUIRE_POSTGRES=1 (CI) makes that a failure, so that CI cannot go green
by skipping them. tests/conftest.py imports both fixtures, which registers them for the suite.

PostgreSQL refuses to run as root. As root (containers, CI), the server's files belong to the
`postgres` system user, and `initdb` and `postgres` run as that user through `setpriv`.
"""

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import LiteralString, Self

import pytest

from benchmarks.loadgen import free_port

try:
    import psycopg
    import psycopg.sql
except ImportError:  # not installed: the fixtures skip (or fail in CI), collection still works
    psycopg = None

# The superuser initdb creates; with `trust` authentication it needs no password.
SUPERUSER = "radar"
# The account PostgreSQL runs as when we are root (Debian's package creates it).
SYSTEM_USER = "postgres"
REQUIRE_ENV = "RADAR_REQUIRE_POSTGRES"
INSTALL_HINT = "install it with scripts/install_system_deps.sh (Debian's postgresql package)"

# Durability is pointless for a throwaway cluster and costs seconds per run.
SERVER_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
}
INITDB_TIMEOUT_S = 120.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# Attempts at starting when the free port we picked was taken in the meantime.
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 30


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here; the message says what is missing and how to get it."""


class PostgresStartError(PostgresUnavailable):
    """initdb or the server failed; the message carries their output or the log's tail."""


def find_pg_bin() -> Path | None:
    """The directory holding `initdb` and `postgres`, or None.

    PATH first; then the highest version under /usr/lib/postgresql/*/bin, which is where
    Debian puts them (its /usr/bin has wrappers for the client tools only, not `initdb`).
    """
    on_path = shutil.which("initdb")
    if on_path is not None:
        # Resolved: a symlink farm (/usr/local/bin) need not hold `postgres` beside `initdb`,
        # and the real directory is where initdb itself looks for `postgres`.
        folder = Path(on_path).resolve().parent
        if _is_pg_bin(folder):
            return folder
    versions: list[tuple[tuple[int, ...], Path]] = []
    for folder in Path("/usr/lib/postgresql").glob("*/bin"):
        version = folder.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version) and _is_pg_bin(folder):
            versions.append((tuple(int(part) for part in version.split(".")), folder))
    return max(versions)[1] if versions else None


def _is_pg_bin(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres"))


def _run_as_prefix() -> tuple[tuple[str, ...], pwd.struct_passwd | None]:
    """The command prefix that drops root to the `postgres` user, and that user's entry;
    nothing when we are not root. Raises PostgresUnavailable when root cannot drop."""
    if os.geteuid() != 0:
        return (), None
    try:
        account = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, which PostgreSQL refuses, and there is no '{SYSTEM_USER}' system "
            f"user to run it as; Debian's postgresql package creates it "
            f"(scripts/install_system_deps.sh), or `useradd --system {SYSTEM_USER}`, or run "
            f"the tests as a normal user"
        ) from None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise PostgresUnavailable(
            "running as root, which PostgreSQL refuses, and setpriv is missing to run it as "
            f"the '{SYSTEM_USER}' user; apt-get install util-linux, or run the tests as a "
            "normal user"
        )
    prefix = (
        setpriv,
        f"--reuid={account.pw_uid}",
        f"--regid={account.pw_gid}",
        "--init-groups",
        "--",
    )
    return prefix, account


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class PostgresServer:
    """A fresh PostgreSQL cluster in a temporary directory, served on a loopback port.

    A context manager: entering runs initdb and starts the server (or raises
    PostgresUnavailable and leaves nothing behind), leaving stops it and removes its files.
    """

    def __init__(
        self,
        bin_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.bin_dir = bin_dir
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.start_timeout = start_timeout
        self.root: Path | None = None
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._counter = itertools.count(1)

    # --- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """initdb, then start the server and wait until it accepts connections."""
        if self.process is not None:
            raise RuntimeError("the server is already running")
        if psycopg is None:
            raise PostgresUnavailable(
                "psycopg 3 is not installed in this environment (scripts/install.sh)"
            )
        bin_dir = self.bin_dir or find_pg_bin()
        if bin_dir is None:
            raise PostgresUnavailable(
                "PostgreSQL is not installed: no initdb on PATH or under "
                f"/usr/lib/postgresql/*/bin; {INSTALL_HINT}"
            )
        prefix, account = _run_as_prefix()
        # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, which the postgres user
        # cannot traverse.
        self.root = Path(tempfile.mkdtemp(prefix="radar-pg-"))
        try:
            self._initdb(bin_dir, prefix, account)
            self._serve(bin_dir, prefix)
        except BaseException:  # KeyboardInterrupt too: never leave a server or files behind
            self.stop()
            raise

    def _initdb(
        self, bin_dir: Path, prefix: tuple[str, ...], account: pwd.struct_passwd | None
    ) -> None:
        assert self.root is not None
        (self.root / "socket").mkdir()
        if account is not None:
            # The server refuses a data directory it does not own; initdb creates `data`
            # inside the (then postgres-owned) root.
            for path in (self.root, self.root / "socket"):
                os.chown(path, account.pw_uid, account.pw_gid)
        command = [
            *prefix,
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        try:
            done = subprocess.run(
                command,
                cwd=self.root,  # the postgres user may not be able to enter ours
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=INITDB_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresStartError(f"initdb took over {INITDB_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip().splitlines()[-LOG_TAIL_LINES:]
            hint = ""
            if account is not None:
                hint = (
                    f" (the '{SYSTEM_USER}' user must be able to enter {self.root}: "
                    "is TMPDIR inside a private directory?)"
                )
            raise PostgresStartError(
                f"initdb failed (exit {done.returncode}){hint}:\n" + "\n".join(output)
            )

    def _serve(self, bin_dir: Path, prefix: tuple[str, ...]) -> None:
        assert self.root is not None
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = free_port()
            command = [
                *prefix,
                str(bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-k",
                str(self.root / "socket"),
                "-p",
                str(self.port),
            ]
            for name, value in self.settings.items():
                command += ["-c", f"{name}={value}"]
            # The server writes to the inherited descriptor, so the file may stay root's.
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    command,
                    cwd=self.root,
                    env=_child_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own process group: Ctrl-C in the terminal reaches pytest, whose
                    # teardown stops the server; and a hung server is killed with its children.
                    start_new_session=True,
                )
            try:
                self._wait_ready()
                return
            except PostgresStartError:
                port_taken = re.search(r"could not bind|could not create any TCP", self.log)
                if attempt == PORT_ATTEMPTS or not port_taken or self._running():
                    raise
                self._stop_process()

    def _running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _wait_ready(self) -> None:
        """Poll with real connections until one succeeds; fail early if the server exits."""
        assert psycopg is not None and self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if not self._running():
                raise PostgresStartError(
                    f"postgres exited with code {self.process.returncode} while starting; "
                    f"its log ({self.log_path}) ends:\n{_tail(self.log_path)}"
                )
            try:
                with psycopg.connect(self._conninfo("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise PostgresStartError(
                    f"postgres did not accept connections within {self.start_timeout:.0f} s "
                    f"({last_error}); its log ends:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL) and remove its files. Idempotent."""
        try:
            self._stop_process()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, exit at once.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
                return
            except subprocess.TimeoutExpired:
                # The postmaster still leads its group here, so the group is surely ours: its
                # backends go with it rather than lingering as orphans.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    # --- addresses --------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "postgres.log"

    @property
    def log(self) -> str:
        """The server's log so far (its stderr)."""
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        assert self.process is not None, "the server is not running"
        return self.process.pid

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the `postgres` maintenance database."""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        """The SQLAlchemy (psycopg 3) URL of database `dbname` on this server."""
        assert self.port is not None, "the server is not started"
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _conninfo(self, dbname: str) -> str:
        assert self.port is not None, "the server is not started"
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    # --- databases --------------------------------------------------------------------------

    def create_database(self) -> str:
        """A new, empty database with a name unique on this server; its SQLAlchemy URL."""
        name = f"radar_test_{next(self._counter)}"
        self._admin("CREATE DATABASE {}", name)
        return self.url_for(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of `url` (one of `create_database`'s), disconnecting its users."""
        name = url.rsplit("/", 1)[1]
        if not re.fullmatch(r"radar_test_\d+", name):
            raise ValueError(f"not a database of create_database: {url}")
        self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def cut_off(self, url: str, *, cut: bool = True) -> None:
        """Simulate an outage of one database (`cut=False` ends it): new connections to it are
        refused and the open ones are terminated, as when its server goes away."""
        name = url.rsplit("/", 1)[1]
        self._admin(f"ALTER DATABASE {{}} WITH ALLOW_CONNECTIONS {str(not cut).lower()}", name)
        if cut:
            assert psycopg is not None
            with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    def _admin(self, statement: LiteralString, name: str) -> None:
        """Run `statement` on database `name` outside a transaction (as CREATE/DROP DATABASE
        must run), on a connection of its own."""
        assert psycopg is not None
        query = psycopg.sql.SQL(statement).format(psycopg.sql.Identifier(name))
        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(query)


def _child_env() -> dict[str, str]:
    """Our environment without libpq's PG* variables, and in the C locale (no locale
    warnings, the same messages everywhere)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session; skips (fails under RADAR_REQUIRE_POSTGRES=1)
    when it cannot run here."""
    server = PostgresServer()
    reason = None
    try:
        server.start()
    except PostgresUnavailable as exc:
        reason = str(exc)
    if reason is not None:  # outside `except`: the report shows the reason, not a chain
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database of its own, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
