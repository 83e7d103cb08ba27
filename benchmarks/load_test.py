"""Load test of the router service on loopback: saturation, sustained load, overload and
recovery, a cancellation storm, and thresholds reloads under load.

Starts `python -m app.cli serve` on a free loopback port (a tiny router is made with
`python -m app.cli make-tiny-model` unless --model-dir is given), drives it with async httpx
and prints one table row per phase; --json writes every figure and check.

Usage:
    python benchmarks/load_test.py                  # benchmark: 600 s hold, ~15 min in all
    python benchmarks/load_test.py --profile ci     # ~1 min: what tests/service/test_load.py runs
    python benchmarks/load_test.py --hold-s 60 --json out.json --server-env OMP_WAIT_POLICY=PASSIVE
"""

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import loadgen
import phases
import yaml


@dataclass(frozen=True)
class Profile:
    saturation_s: float  # closed-loop run that measures the saturation throughput
    hold_s: float  # 80 % of saturation, sustained
    overload_s: float  # each of 2x and 5x saturation
    recovery_s: float  # 50 % of saturation right after the 5x phase, and after the storm
    storm: int  # requests in the cancellation storm
    storm_timeout_s: float  # each storm client gives up after this
    reloads: int  # thresholds reloads under load
    reload_s: float  # the load they happen under
    callers: tuple[int, ...]  # closed-loop caller counts tried for the saturation


PROFILES = {
    "benchmark": Profile(30, 600, 30, 10, 1000, 0.01, 100, 30, (8, 16, 32)),
    "ci": Profile(3, 20, 3, 2, 1000, 0.01, 100, 4, (8, 16)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="benchmark", help="durations")
    p.add_argument("--hold-s", type=float, help="override the profile's sustained-load period")
    p.add_argument("--model-dir", type=Path, help="model store (default: a fresh tiny router)")
    p.add_argument("--deadline-ms", type=float, default=2000, help="RADAR_DEADLINE_MS")
    p.add_argument("--queue-size", type=int, default=512, help="RADAR_QUEUE_SIZE")
    p.add_argument(
        "--posts-per-request",
        type=int,
        default=4,
        help="1: POST /route; more: POST /route/batch with that many posts (default 4, so "
        "that one client process can offer 5x what the server takes)",
    )
    p.add_argument("--server-cpus", help="pin the server to these CPUs, e.g. 1 (Linux)")
    p.add_argument("--client-cpus", help="pin this load generator to these CPUs, e.g. 0")
    p.add_argument("--server-env", action="append", default=[], metavar="K=V", help="extra env")
    p.add_argument("--json", type=Path, help="write all figures and checks here")
    p.add_argument("--workdir", type=Path, help="server log, thresholds (default: a temp dir)")
    return p.parse_args(argv)


def make_model(workdir: Path) -> Path:
    out = workdir / "tiny"
    subprocess.run(  # noqa: S603  (our own CLI, fixed arguments)
        [sys.executable, "-m", "app.cli", "make-tiny-model", str(out)],
        cwd=loadgen.ROOT,
        check=True,
        capture_output=True,
    )
    return out


def write_thresholds(path: Path, model_dir: Path, version: str, taus: dict[str, float]) -> None:
    """Atomic: write a temporary file, rename it over the active one (the documented way)."""
    config = json.loads((model_dir / "router.json").read_text())
    doc = {
        "version": version,
        "model_version": config["model_version"],
        "categories": {name: {"tau": tau} for name, tau in taus.items()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    profile = PROFILES[args.profile]
    if args.hold_s is not None:
        profile = replace(profile, hold_s=args.hold_s)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="radar-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or make_model(workdir)
    categories = json.loads((model_dir / "router.json").read_text())["categories"]
    thresholds = workdir / "thresholds.yaml"
    write_thresholds(thresholds, model_dir, "load-0", dict.fromkeys(categories, 0.5))
    port, token = loadgen.free_port(), "load-test-token"
    env = {
        "RADAR_ADMIN_TOKEN": token,
        "RADAR_DEADLINE_MS": str(args.deadline_ms),
        "RADAR_QUEUE_SIZE": str(args.queue_size),
        "RADAR_THRESHOLDS_POLL_S": "3600",  # reloads through the admin endpoint only
        "RADAR_LOG_LEVEL": "warning",  # no access log line per request
        # What `app.service.server.run_server` sets before torch loads (docs/reliability.md);
        # given here too while `radar serve` does not run through it yet.
        "OMP_WAIT_POLICY": "PASSIVE",
        # The event loop before the model when CPUs are short (docs/reliability.md).
        "RADAR_MODEL_THREAD_NICE": "10",
        **dict(kv.split("=", 1) for kv in args.server_env),
    }
    argv = ["--port", str(port), "--model-dir", str(model_dir), "--thresholds", str(thresholds)]
    server = loadgen.Server(argv, env, workdir / "server.log", cpus=_cpus(args.server_cpus))
    url = f"http://127.0.0.1:{port}"
    path, bodies = loadgen.payloads(posts_per_request=args.posts_per_request)
    report: dict[str, Any] = {
        "profile": asdict(profile),
        "server_env": env,
        "endpoint": path,
        "posts_per_request": args.posts_per_request,
        "cpus": {"server": args.server_cpus, "client": args.client_cpus},
        "load_average_before": os.getloadavg(),
        "phases": {},
        "checks": {},
    }
    load = loadgen.ShardedClient(url, timeout=60)
    try:
        server.wait_ready(url)
        async with httpx.AsyncClient(base_url=url, timeout=30) as control:
            ctx = phases.Context(
                url=url,
                pid=server.process.pid,
                path=path,
                bodies=bodies,
                deadline_s=args.deadline_ms / 1000,
                profile=profile,
                token=token,
                write=lambda version, taus: write_thresholds(thresholds, model_dir, version, taus),
                categories=categories,
                load=load,
                control=control,
            )
            await phases.run_all(ctx, report)
    finally:
        await load.aclose()
        report["exit_status"] = server.stop()
        report["server_log"] = str(workdir / "server.log")
        report["load_average_after"] = os.getloadavg()
    # 0 once `radar serve` runs through app.service.server.run_server; -15 before that
    # (uvicorn re-raises SIGTERM after its graceful shutdown).
    report["checks"]["SIGTERM: clean exit after the drain"] = report["exit_status"] in (0, -15)
    return report


def _cpus(spec: str | None) -> set[int] | None:
    return {int(c) for c in spec.split(",")} if spec else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client_cpus:
        os.sched_setaffinity(0, _cpus(args.client_cpus) or set())
    started = time.monotonic()
    report = asyncio.run(run(args))
    report["wall_s"] = round(time.monotonic() - started, 1)
    print("\nchecks:")
    for name, ok in report["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=_jsonable))
    return 0 if all(report["checks"].values()) else 1


def _jsonable(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
