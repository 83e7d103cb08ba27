"""Joining verdicts to decisions costs the same however long the log is: each key is one probe
of the primary key, not a scan (counted in SQLite virtual-machine steps, not seconds, so the
check holds on a busy machine)."""

import time
from pathlib import Path

from app.feedback.log import DecisionLog, DecisionRecord, _logged_keys


def steps_to_join(path: Path, n_decisions: int, keys: set[tuple[str, str]]) -> int:
    log = DecisionLog(path, retention_s=1e9, max_rows=10**9)
    log.start()
    try:
        now = time.time()
        log.record(
            [
                DecisionRecord(f"p{i}", "spam", 0.5, True, False, 0.01, "t", "m", now)
                for i in range(n_decisions)
            ]
        )
        log.flush()
        with log.engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            steps = [0]

            def count() -> int:
                steps[0] += 1
                return 0  # go on

            dbapi.set_progress_handler(count, 100)  # one call per 100 VM instructions
            try:
                found = _logged_keys(conn, keys)
            finally:
                dbapi.set_progress_handler(None, 0)
        assert found == {k for k in keys if k[0] in {f"p{i}" for i in range(n_decisions)}}
        return steps[0]
    finally:
        log.stop()


def test_joining_verdicts_does_not_scan_the_log(tmp_path: Path) -> None:
    keys = {(f"p{i}", "spam") for i in range(0, 4000, 8)} | {("absent", "spam")}
    small = steps_to_join(tmp_path / "small.sqlite3", 10_000, keys)
    large = steps_to_join(tmp_path / "large.sqlite3", 80_000, keys)
    # 8x the rows: a scan would take 8x the steps; index probes only grow with the depth of
    # the B-tree.
    assert large < 1.5 * small, (small, large)
