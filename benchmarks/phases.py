"""The phases of `load_test.py`: each prints a table row and adds figures and checks."""

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import loadgen

COLUMNS = [
    "phase",
    "offered_rps",
    "sent_rps",
    "requests",
    "ok",
    "shed_503",
    "other_err",
    "goodput_rps",
    "ok_p50_ms",
    "ok_p99_ms",
    "ok_max_ms",
    "shed_p50_ms",
    "shed_p99_ms",
    "server_cpu_pct",
    "client_cpu_pct",
    "rss_start_mb",
    "rss_end_mb",
    "max_queue",
]


@dataclass
class Context:
    url: str
    pid: int  # the server's
    path: str  # /route or /route/batch
    bodies: list[bytes]
    deadline_s: float
    profile: Any  # load_test.Profile
    token: str
    write: Callable[[str, dict[str, float]], None]  # (version, taus): a new thresholds file
    categories: list[str]
    load: loadgen.ShardedClient
    control: httpx.AsyncClient  # metrics, readiness, admin: never queued behind the load


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.1f}"
    return str(value)


_header_printed = [False]


def _print(row: dict[str, Any]) -> None:
    lines = loadgen.table([row], COLUMNS, _fmt).splitlines()
    if not _header_printed[0]:
        print(lines[0])
        _header_printed[0] = True
    print(lines[1], flush=True)


def _row(name: str, rate: float, sent: float, stats: dict[str, Any]) -> dict[str, Any]:
    statuses = stats["statuses"]
    shed = statuses.get("503", 0)
    keys = ("goodput_rps", "ok_p50_ms", "ok_p99_ms", "ok_max_ms", "shed_p50_ms", "shed_p99_ms")
    return {
        "phase": name,
        "offered_rps": rate,
        "sent_rps": sent,
        "requests": stats["requests"],
        "ok": statuses.get("200", 0),
        "shed_503": shed,
        "other_err": stats["errors"] - shed,
        **{k: stats[k] for k in keys},
        "statuses": statuses,  # in the JSON, not the table
    }


async def _open(
    ctx: Context, name: str, rate: float, seconds: float, keep_body: bool = False
) -> tuple[dict[str, Any], dict[str, Any], list[loadgen.Outcome]]:
    """One open-loop phase with RSS / queue sampling and CPU accounting."""
    server_cpu, client_cpu, started = loadgen.cpu_s(ctx.pid), time.process_time(), time.monotonic()
    with loadgen.Sampler(ctx.control, ctx.pid) as sampler:
        outcomes, sent = await loadgen.open_loop(
            ctx.load, ctx.path, ctx.bodies, rate, seconds, keep_body
        )
    wall = time.monotonic() - started
    stats = loadgen.summarize(outcomes, seconds, ctx.deadline_s)
    row = _row(name, rate, sent, stats)
    row.update(
        server_cpu_pct=100 * (loadgen.cpu_s(ctx.pid) - server_cpu) / wall,
        client_cpu_pct=100 * (time.process_time() - client_cpu) / wall,
        rss_start_mb=sampler.rss[0] if sampler.rss else float("nan"),
        rss_end_mb=sampler.rss[-1] if sampler.rss else float("nan"),
        max_queue=max(sampler.queue, default=float("nan")),
    )
    _print(row)
    return row, {**stats, "rss_samples_mb": sampler.rss}, outcomes


async def saturation(ctx: Context, report: dict[str, Any]) -> float:
    """Closed loop at a few caller counts; the best rate of 200s is the saturation."""
    p = ctx.profile
    await loadgen.closed_loop(ctx.load, ctx.path, ctx.bodies, 4, 1.0)  # connections, warm-up
    best = 0.0
    for callers in p.callers:
        seconds = p.saturation_s / len(p.callers)
        outcomes = await loadgen.closed_loop(ctx.load, ctx.path, ctx.bodies, callers, seconds)
        stats = loadgen.summarize(outcomes, seconds, ctx.deadline_s)
        rate = stats["statuses"].get("200", 0) / seconds
        row = _row(f"saturation {callers} callers", float("nan"), float("nan"), stats)
        _print(row)
        report["phases"][f"saturation_{callers}"] = row
        best = max(best, rate)
    report["saturation_rps"] = best
    return best


async def run_all(ctx: Context, report: dict[str, Any]) -> None:
    p, checks = ctx.profile, report["checks"]
    sat = await saturation(ctx, report)

    row, stats, _ = await _open(ctx, "hold 80%", 0.8 * sat, p.hold_s)
    rss = stats["rss_samples_mb"]
    tenth = max(1, len(rss) // 10)
    report["hold_rss_growth_mb"] = statistics.median(rss[-tenth:]) - statistics.median(rss[:tenth])
    report["phases"]["hold"] = row
    checks["hold: zero errors"] = row["ok"] == row["requests"]
    checks["hold: RSS flat (< 50 MiB growth)"] = report["hold_rss_growth_mb"] < 50
    checks["hold: the client kept the rate"] = row["sent_rps"] >= 0.9 * row["offered_rps"]

    for factor in (2, 5):
        name = f"overload {factor}x"
        row, stats, out = await _open(ctx, name, factor * sat, p.overload_s)
        report["phases"][f"overload_{factor}x"] = row
        late = sum(o.status == 200 and o.latency > ctx.deadline_s for o in out)
        row["ok_late_client_side"] = late
        checks[f"{name}: goodput >= 95 % of saturation"] = row["goodput_rps"] >= 0.95 * sat
        checks[f"{name}: 503s carry Retry-After"] = stats["shed_without_retry_after"] == 0
        checks[f"{name}: 503 median < 50 ms"] = not row["shed_p50_ms"] >= 50
        checks[f"{name}: accepted answered within the deadline"] = late == 0
        checks[f"{name}: only 200 or 503"] = row["other_err"] == 0

    row, _, _ = await _open(ctx, "recovery 50%", 0.5 * sat, p.recovery_s)
    report["phases"]["recovery"] = row
    checks["recovery: zero errors right after 5x"] = row["ok"] == row["requests"]

    await storm(ctx, report, checks, sat)
    await reloads(ctx, report, checks, sat)


async def storm(ctx: Context, report: dict[str, Any], checks: dict[str, bool], sat: float) -> None:
    """Callers that give up after 10 ms, all at once; then normal traffic must all succeed."""
    p = ctx.profile
    before = loadgen.metric_values((await ctx.control.get("/metrics")).text)
    started = time.monotonic()
    # The request goes out whole (connect/write/pool get 10 s), then the caller waits
    # `storm_timeout_s` for the answer and hangs up: the classic abandoned request.
    timeout = httpx.Timeout(10.0, read=p.storm_timeout_s)
    quitters = loadgen.ShardedClient(ctx.url, shards=40, connections=25, timeout=timeout)
    try:
        outcomes = await asyncio.gather(
            *(
                loadgen.send(quitters, ctx.path, ctx.bodies[i % len(ctx.bodies)])
                for i in range(p.storm)
            )
        )
    finally:
        await quitters.aclose()
    storm_s = time.monotonic() - started
    await asyncio.sleep(0.5)  # let the server notice the last hang-ups
    during = loadgen.metric_values((await ctx.control.get("/metrics")).text)
    row, _, _ = await _open(ctx, "after storm 50%", 0.5 * sat, p.recovery_s)
    ready = (await ctx.control.get("/readyz")).status_code
    gave_up = sum(o.status is None for o in outcomes)
    answered: dict[str, int] = {}
    for o in outcomes:
        if o.status is not None:
            answered[str(o.status)] = answered.get(str(o.status), 0) + 1
    report["phases"]["after_storm"] = row
    report["storm"] = {
        "requests": p.storm,
        "client_gave_up": gave_up,
        "answered_in_time": answered,
        "seconds": round(storm_s, 2),
        "server_saw_hang_ups": _delta(during, before, "radar_rejected_total{reason=client_gone}"),
        "server_refused_overloaded": _delta(
            during, before, "radar_rejected_total{reason=overloaded}"
        ),
        "posts_routed_anyway": _delta(during, before, "radar_posts_total"),
    }
    print(f"storm: {report['storm']}", flush=True)
    checks["storm: normal traffic after it 100 % success"] = row["ok"] == row["requests"] > 0
    checks["storm: batch loop alive (ready)"] = ready == 200


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def taus_for(version: int, categories: list[str]) -> dict[str, float]:
    """Thresholds near the tiny router's scores (~0.5), different for every version."""
    return {c: 0.45 + ((version * 7 + k * 3) % 11) / 100 for k, c in enumerate(categories)}


def _answers(body: dict[str, Any]) -> list[dict[str, Any]]:
    return list(body.get("results", [body]))


async def reloads(
    ctx: Context, report: dict[str, Any], checks: dict[str, bool], sat: float
) -> None:
    """Thresholds reloaded under load; every answer must follow the version it names."""
    p = ctx.profile
    versions = {"load-0": dict.fromkeys(ctx.categories, 0.5)}
    auth = {"Authorization": f"Bearer {ctx.token}"}
    failed = [0]

    async def reloader() -> None:
        for i in range(1, p.reloads + 1):
            taus = taus_for(i, ctx.categories)
            versions[f"load-{i}"] = taus  # known before any answer can name it
            ctx.write(f"load-{i}", taus)
            response = await ctx.control.post("/admin/thresholds/reload", headers=auth)
            failed[0] += response.status_code != 200
            await asyncio.sleep(p.reload_s / p.reloads)

    load = _open(ctx, "reloads 50%", 0.5 * sat, p.reload_s, keep_body=True)
    (row, _, outcomes), _ = await asyncio.gather(load, reloader())
    inconsistent, seen = 0, set()
    for answer in (a for o in outcomes if o.body for a in _answers(o.body)):
        seen.add(answer["thresholds_version"])
        taus = versions[answer["thresholds_version"]]
        expected = [c for c in ctx.categories if answer["scores"][c] > taus[c]]
        inconsistent += answer["dispatch"] != expected or answer["auto_pass"] != (not expected)
    report["phases"]["reloads"] = row
    report["reloads"] = {
        "reloads": p.reloads,
        "failed_reloads": failed[0],
        "versions_seen_in_answers": len(seen),
        "inconsistent_answers": inconsistent,
    }
    print(f"reloads: {report['reloads']}", flush=True)
    checks["reloads: zero failed requests"] = row["ok"] == row["requests"]
    checks["reloads: zero failed reloads"] = failed[0] == 0
    checks["reloads: every answer follows its version"] = inconsistent == 0
