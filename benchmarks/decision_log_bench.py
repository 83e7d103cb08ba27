"""What the decision log costs the service: rows per second and CPU per row of the writer,
the latency of `POST /feedback`'s commit, and of the quality estimate, on SQLite and
PostgreSQL, beside a baseline in the same run: the plain `sqlite3` writer of earlier releases
(`INSERT OR REPLACE` of the same tuples, one transaction per batch).

The writer runs on its own thread, but in the service's process: its CPU time per row is what
it takes from routing (the GIL), so that is the figure to watch, not only wall time.

    python benchmarks/decision_log_bench.py                       # SQLite and the baseline
    python benchmarks/decision_log_bench.py --start-postgres      # + a throwaway PostgreSQL
    python benchmarks/decision_log_bench.py --postgres-url postgresql://radar@db/radar
    python benchmarks/decision_log_bench.py --long-log 100 --start-postgres   # 1.5 M decisions
"""

import argparse
import contextlib
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.feedback.log import DecisionLog, DecisionRecord, Verdict  # noqa: E402
from app.feedback.quality import estimate_quality  # noqa: E402
from app.feedback.schema import describe  # noqa: E402

CATEGORIES = ("spam", "nudity", "violence", "hate", "drugs", "weapons")
_LEGACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    post_id TEXT NOT NULL, category TEXT NOT NULL, score REAL, dispatched INTEGER NOT NULL,
    audited INTEGER NOT NULL, audit_rate REAL NOT NULL, thresholds_version TEXT,
    model_version TEXT NOT NULL, decided_at REAL NOT NULL, PRIMARY KEY (post_id, category));
"""


def batches(n_batches: int, posts_per_batch: int, seed: int) -> list[list[DecisionRecord]]:
    """Decisions as the service buffers them: every category of each post; 2 % retries."""
    rng = random.Random(seed)  # noqa: S311 - synthetic decisions, nothing secret
    out, serial, now = [], 0, time.time()
    for _ in range(n_batches):
        batch = []
        for _ in range(posts_per_batch):
            serial += 1
            post = f"p{rng.randrange(serial)}" if rng.random() < 0.02 else f"p{serial}"
            for name in CATEGORIES:
                score = rng.random()
                dispatched = score > 0.7
                audited = not dispatched and rng.random() < 0.01
                batch.append(
                    DecisionRecord(post, name, score, dispatched, audited, 0.01, "t1", "m1", now)
                )
        out.append(batch)
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def bench_log(location: Path | str, work: list[list[DecisionRecord]], verdicts: int) -> dict:
    log = DecisionLog(location, retention_s=86400, max_rows=10**8)
    log.start()
    try:
        walls, cpus = [], []
        for batch in tqdm(work, desc=f"flush {describe(location)}", leave=False):
            log.record(batch)
            wall, cpu = timed(log.flush)
            walls.append(wall)
            cpus.append(cpu)
        rows = sum(len(b) for b in work)
        judged = [
            Verdict(r.post_id, r.category, r.score is not None and r.score > 0.5)
            for r in work[-1][:verdicts]
        ]
        feedback_wall, _ = timed(lambda: log.add_feedback(judged))
        with log.engine.connect() as conn:
            quality_wall, _ = timed(lambda: estimate_quality(conn, CATEGORIES))
    finally:
        log.stop()
    return summary(rows, walls, cpus) | {
        "feedback_commit_ms": 1000 * feedback_wall,
        "quality_estimate_ms": 1000 * quality_wall,
    }


def bench_legacy_sqlite(path: Path, work: list[list[DecisionRecord]]) -> dict:
    """The previous release's writer: sqlite3 directly, tuples as they are."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_LEGACY_SCHEMA)
    walls, cpus = [], []

    def flush(batch: list[tuple[object, ...]]) -> None:
        with conn:
            conn.executemany(
                "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch
            )

    # The previous release's nine columns (`unanswered`, the tenth field, came after it),
    # cut before the clock starts.
    legacy = [[record[:9] for record in batch] for batch in work]
    try:
        for batch in tqdm(legacy, desc="flush sqlite3 (baseline)", leave=False):
            wall, cpu = timed(lambda b=batch: flush(b))
            walls.append(wall)
            cpus.append(cpu)
    finally:
        conn.close()
    return summary(sum(len(b) for b in work), walls, cpus)


def summary(rows: int, walls: list[float], cpus: list[float]) -> dict:
    return {
        "rows": rows,
        "rows_per_s": rows / sum(walls),
        "cpu_us_per_row": 1e6 * sum(cpus) / rows,
        "flush_p50_ms": 1000 * statistics.median(walls),
        "flush_max_ms": 1000 * max(walls),
    }


def bench_long_log(location: Path | str, n_batches: int, posts_per_batch: int) -> dict:
    """A long log, as after hours of traffic: its decisions, then the verticals' verdicts on
    every dispatched or audited one in requests of 10,000; then what one more such request,
    and one quality estimate over everything, cost."""
    log = DecisionLog(location, retention_s=1e9, max_rows=10**9)
    log.start()
    try:
        work = batches(n_batches, posts_per_batch, seed=2)
        start = time.perf_counter()
        judged = []
        for batch in tqdm(work, desc=f"long log {describe(location)}", leave=False):
            log.record(batch)
            log.flush()
            judged += [
                Verdict(r.post_id, r.category, (r.score or 0) > 0.8)
                for r in batch
                if r.dispatched or r.audited
            ]
        earlier, last = judged[:-10_000], judged[-10_000:]  # the last request is timed
        for i in range(0, len(earlier), 10_000):
            log.add_feedback(earlier[i : i + 10_000])
        fill_s = time.perf_counter() - start
        request_wall, _ = timed(lambda: log.add_feedback(last))
        with log.engine.connect() as conn:
            estimate_wall, estimate_cpu = timed(lambda: estimate_quality(conn, CATEGORIES))
    finally:
        log.stop()
    return {
        "decisions": sum(len(b) for b in work),
        "verdicts": len(judged),
        "fill_s": fill_s,
        "last_verdict_request_s": request_wall,
        "last_verdict_request_size": len(last),
        "estimate_s": estimate_wall,
        "estimate_cpu_s_in_process": estimate_cpu,
    }


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    from tests.postgres import PostgresServer  # the tests' real, temporary server

    with PostgresServer() as server:
        yield server.create_database()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="flushes per backend")
    parser.add_argument(
        "--posts-per-batch",
        type=int,
        default=250,
        help="posts per flush (6 rows each); 250 = 500 posts/s at the 0.5 s flush interval",
    )
    parser.add_argument("--verdicts", type=int, default=1000, help="in the one feedback commit")
    parser.add_argument("--postgres-url", help="also measure this PostgreSQL database")
    parser.add_argument(
        "--start-postgres", action="store_true", help="start a throwaway PostgreSQL (tests/)"
    )
    parser.add_argument(
        "--long-log",
        type=int,
        metavar="BATCHES",
        help="instead: build a log of BATCHES flushes (e.g. 100: 1.5 M decisions) with "
        "verdicts, then time one more verdict request and one quality estimate",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    if args.long_log is not None:
        return long_log_main(args)
    work = batches(args.batches, args.posts_per_batch, seed=1)
    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        results["sqlite3 (baseline)"] = bench_legacy_sqlite(folder / "legacy.sqlite3", work)
        results["sqlite"] = bench_log(folder / "log.sqlite3", work, args.verdicts)
        url = args.postgres_url
        if url is None and args.start_postgres:
            url = stack.enter_context(throwaway_postgres())
        if url is not None:
            results["postgresql"] = bench_log(url, work, args.verdicts)

    rows = work and sum(len(b) for b in work)
    print(f"{rows} rows in {len(work)} flushes of {len(work[0])} rows")
    head = f"{'writer':<20} {'rows/s':>9} {'CPU µs/row':>11} {'flush p50':>10} {'flush max':>10}"
    print(head + f" {'feedback':>9} {'estimate':>9}")
    for name, r in results.items():
        extra = (
            f" {r['feedback_commit_ms']:>7.1f}ms {r['quality_estimate_ms']:>7.1f}ms"
            if "feedback_commit_ms" in r
            else f" {'-':>9} {'-':>9}"
        )
        print(
            f"{name:<20} {r['rows_per_s']:>9.0f} {r['cpu_us_per_row']:>11.1f} "
            f"{r['flush_p50_ms']:>8.1f}ms {r['flush_max_ms']:>8.1f}ms" + extra
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def long_log_main(args: argparse.Namespace) -> int:
    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        locations: dict[str, Path | str] = {"sqlite": folder / "long.sqlite3"}
        url = args.postgres_url
        if url is None and args.start_postgres:
            url = stack.enter_context(throwaway_postgres())
        if url is not None:
            locations["postgresql"] = url
        for name, location in locations.items():
            results[name] = bench_long_log(location, args.long_log, args.posts_per_batch)
    for name, r in results.items():
        print(
            f"{name:<11} {r['decisions']} decisions, {r['verdicts']} verdicts, filled in "
            f"{r['fill_s']:.1f} s; {r['last_verdict_request_size']} more verdicts: "
            f"{r['last_verdict_request_s']:.2f} s; estimate: {r['estimate_s']:.2f} s "
            f"({r['estimate_cpu_s_in_process']:.2f} s CPU in this process)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
