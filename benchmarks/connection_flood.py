"""Normal traffic while many connections sit silent on the server (issue 13, item 1).

Starts the real service (`python -m app.cli serve`, tiny random router) and runs two phases
of the same normal traffic, one client sending text posts one after another, each on a new
connection (a new client must get in, not only one holding a keep-alive connection):

- baseline: nothing else;
- flood: meanwhile `--connections` connections are opened and kept open, each sending
  nothing, or with `--partial` the first line and one header of a request, then nothing.
  A connection the server closes is opened again at once (`--reconnect`, the default): an
  attacker keeps the flood up.

Prints, per phase, the normal requests' status counts and latency percentiles, the server's
open file descriptors and RSS (start / peak / end, sampled every 0.2 s from /proc), and how
many silent connections the server closed (its watchdog, `RADAR_HEADER_TIMEOUT_S`).

    python benchmarks/connection_flood.py --seconds 30 --connections 3000
"""

import argparse
import asyncio
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import rss_mb, tiny_service  # noqa: E402

PARTIAL = b"POST /route HTTP/1.1\r\nHost: radar\r\n"  # and then nothing


@dataclass
class Sampled:
    """The server's file descriptors and RSS, sampled while a phase runs."""

    fds: list[int] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pid: int, stop: threading.Event, into: Sampled) -> None:
    while not stop.is_set():
        into.fds.append(open_fds(pid))
        into.rss.append(rss_mb(pid))
        stop.wait(0.2)


def normal_traffic(url: str, seconds: float) -> tuple[Counter[str], list[float]]:
    """Text posts one after another, each on a fresh connection."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    i = 0
    while time.monotonic() < stop_at:
        body = {"post_id": f"n{i}", "title": f"normal post {i}", "ocr_text": ""}
        started = time.monotonic()
        try:
            with httpx.Client(timeout=10) as client:  # a new client: a new connection
                status = str(client.post(f"{url}/route", json=body).status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        latencies.append(time.monotonic() - started)
        statuses[status] += 1
        i += 1
    return statuses, latencies


async def flood(
    port: int, connections: int, partial: bool, reconnect: bool, stop_at: float
) -> dict:
    """Hold `connections` silent connections until `stop_at`; count what the server did."""
    counts = Counter[str]()

    async def hold() -> None:
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                counts[f"connect {type(exc).__name__}"] += 1
                await asyncio.sleep(0.1)
                continue
            counts["opened"] += 1
            if partial:
                writer.write(PARTIAL)
            try:
                await asyncio.wait_for(reader.read(), timeout=max(stop_at - time.monotonic(), 0))
                counts["closed by the server"] += 1
            except TimeoutError:
                pass
            except OSError:
                counts["reset by the server"] += 1
            writer.close()
            if not reconnect:
                return

    await asyncio.gather(*(hold() for _ in range(connections)))
    return dict(counts)


def phase(url: str, port: int, pid: int, seconds: float, args: argparse.Namespace | None) -> dict:
    sampled, stop = Sampled(), threading.Event()
    sampler = threading.Thread(target=sample, args=(pid, stop, sampled))
    sampler.start()
    attack: dict = {}
    attacker = None
    if args is not None:
        stop_at = time.monotonic() + seconds + 1

        def run_flood() -> None:
            attack.update(
                asyncio.run(flood(port, args.connections, args.partial, args.reconnect, stop_at))
            )

        attacker = threading.Thread(target=run_flood)
        attacker.start()
        time.sleep(1)  # the flood is up before the normal traffic starts
    statuses, latencies = normal_traffic(url, seconds)
    if attacker is not None:
        attacker.join()
    stop.set()
    sampler.join()
    ms = np.array(latencies) * 1000
    return {
        "normal": dict(statuses),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "fds": (sampled.fds[0], max(sampled.fds), sampled.fds[-1]),
        "rss": (sampled.rss[0], max(sampled.rss), sampled.rss[-1]),
        "attack": attack,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase (30)")
    parser.add_argument("--connections", type=int, default=3000, help="silent connections")
    parser.add_argument("--partial", action="store_true", help="send a partial request head")
    parser.add_argument(
        "--no-reconnect", dest="reconnect", action="store_false", help="open each one once"
    )
    parser.add_argument("--header-timeout-s", type=float, default=10.0, help="server setting")
    parser.add_argument("--max-connections", type=int, default=2048, help="server setting")
    args = parser.parse_args()
    settings = {
        "RADAR_HEADER_TIMEOUT_S": str(args.header_timeout_s),
        "RADAR_MAX_CONNECTIONS": str(args.max_connections),
    }
    with tiny_service(settings) as (url, pid):
        port = int(url.rsplit(":", 1)[1])
        results = {
            "baseline": phase(url, port, pid, args.seconds, None),
            "flood": phase(url, port, pid, args.seconds, args),
        }
    kind = "partial heads" if args.partial else "silent"
    print(
        f"{args.connections} {kind} connections, reconnect={args.reconnect}, "
        f"RADAR_HEADER_TIMEOUT_S={args.header_timeout_s:g}, "
        f"RADAR_MAX_CONNECTIONS={args.max_connections}, server fd limit "
        f"{os.sysconf('SC_OPEN_MAX')}"
    )
    print(
        f"{'phase':<9} {'normal status':<28} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'fds start/peak/end':>20} {'RSS MiB start/peak/end':>24}  flood"
    )
    for name, r in results.items():
        fds = "{} / {} / {}".format(*r["fds"])
        rss = "{:.0f} / {:.0f} / {:.0f}".format(*r["rss"])
        print(
            f"{name:<9} {r['normal']!s:<28} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{fds:>20} {rss:>24}  {r['attack']}"
        )


if __name__ == "__main__":
    main()
