"""Tables and goals of `serving_bench.py` (issue 6's benchmarks 1-4), as markdown."""

import statistics
from typing import Any

Row = dict[str, Any]


def medians(rows: list[Row], keys: list[str]) -> list[Row]:
    """One row per `keys` group: the median of each figure over the rounds, and the range
    of the throughput (`<figure>_min`, `<figure>_max`) where there was more than one."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    merged = []
    for group in groups.values():
        row = {k: group[0][k] for k in keys}
        for name, value in group[0].items():
            if name in keys or name == "round" or not isinstance(value, int | float):
                continue
            values = [r[name] for r in group if name in r]
            row[name] = statistics.median(values)
            if name == "posts_per_s" and len(values) > 1:
                row["posts_per_s_min"], row["posts_per_s_max"] = min(values), max(values)
        row["rounds"] = len(group)
        merged.append(row)
    return merged


def _rate(row: Row) -> str:
    """Throughput, with its range over the rounds when there were several."""
    if "posts_per_s_min" not in row:
        return f"{row['posts_per_s']:.1f}"
    return f"{row['posts_per_s']:.1f} ({row['posts_per_s_min']:.0f}–{row['posts_per_s_max']:.0f})"


def sweep_line(row: Row) -> str:
    extra = ""
    if "mean_batch" in row:
        extra = (
            f"  batch {row['mean_batch']:.1f}  wait {row['queue_wait_ms']:.1f} ms"
            f"  fwd {row['forward_ms']:.1f} ms"
            f"  ahead used/redone {row.get('prepared_ahead_used', 0):.0f}"
            f"/{row.get('prepared_ahead_redone', 0):.0f}"
        )
    return (
        f"{row['server']:>20}  c={row['concurrency']:<4} {row['posts_per_s']:7.1f} posts/s  "
        f"p50 {row['p50_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}"
        f"  client cpu {row['client_cpu_pct']:.0f} %{extra}"
    )


def _latencies(row: Row) -> str:
    return f"{row['p50_ms']:.0f} / {row['p99_ms']:.0f}"


def _ahead_of(ours: Row, theirs: Row) -> bool:
    """Issue 6's and 15's goal against LitServe: at least its throughput, at no worse p99."""
    return ours["posts_per_s"] >= theirs["posts_per_s"] and ours["p99_ms"] <= theirs["p99_ms"]


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _num(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any], max_batch: int, max_wait_ms: float) -> str:
    forward = {row["batch"]: row for row in result["inprocess"]["forward"]}
    ceiling, single = forward[max_batch], forward[1]
    by_server: dict[str, dict[int, Row]] = {}
    for row in result["sweeps"]:
        by_server.setdefault(row["server"], {})[row["concurrency"]] = row
    radar = by_server[f"radar batch<={max_batch}"]
    batch1 = by_server.get("radar batch<=1", {})
    litserves = {name: rows for name, rows in by_server.items() if name.startswith("litserve")}
    top = max(radar)
    rounds = result["sweeps"][0].get("rounds", 1)
    lines = [
        f"Figures are medians of {rounds} round(s), servers restarted each round; posts/s "
        "ranges over the rounds in parentheses.",
        "",
        f"In-process forward (`RouterEngine.route`, {result['inprocess']['torch_threads']} "
        f"torch threads, {result['inprocess']['tokens_per_post']:.0f} tokens/post): "
        f"batch 1 {single['forward_ms']:.1f} ms = {single['posts_per_s']:.1f} posts/s; "
        f"batch {max_batch} {ceiling['forward_ms']:.1f} ms = {ceiling['posts_per_s']:.1f} "
        "posts/s (the ceiling).",
        "",
        "**1. HTTP vs in-process** (goal ≥ 0.9×)",
        "",
        "| | posts/s | × in-process |",
        "|---|---|---|",
        f"| in-process forward, batch {max_batch} | {ceiling['posts_per_s']:.1f} | 1.00 |",
    ]
    best = max(radar.values(), key=lambda r: r["posts_per_s"])
    ratio = best["posts_per_s"] / ceiling["posts_per_s"]
    lines += [
        f"| `/route` at saturation (c={best['concurrency']}) | {_rate(best)} | "
        f"{ratio:.2f} — {_verdict(ratio >= 0.9)} |",
        "",
        f"**2. Dynamic batching vs batch-1** (max batch {max_batch}, wait {max_wait_ms:g} ms)",
        "",
        "| concurrency | batched posts/s | p50 / p99 ms | batch-1 posts/s | p50 / p99 ms | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for c in sorted(radar):
        b, s = radar[c], batch1.get(c)
        lines.append(
            f"| {c} | {_rate(b)} | {_latencies(b)} | "
            f"{_rate(s) if s else '–'} | "
            f"{_num(s and s['p50_ms'], 0)} / {_num(s and s['p99_ms'], 0)} | "
            f"{_num(s and b['posts_per_s'] / s['posts_per_s'], 2)} |"
        )
    if max_batch in radar and max_batch in batch1:
        at = radar[max_batch]["posts_per_s"]
        vs_ceiling = at / ceiling["posts_per_s"]
        vs_single = at / batch1[max_batch]["posts_per_s"]
        lines += [
            "",
            f"At concurrency {max_batch}: {vs_ceiling:.2f}× the in-process ceiling (goal ≥ 0.9: "
            f"{_verdict(vs_ceiling >= 0.9)}), {vs_single:.2f}× the batch-1 service (goal ≥ 2: "
            f"{_verdict(vs_single >= 2)}).",
        ]
    for name, rows in litserves.items():
        lines += _litserve_table(radar, name, rows)
    lines += _sweep_table(radar, max_batch)
    lines += _latency_goals(radar, forward, max_batch, max_wait_ms, top)
    return "\n".join(lines) + "\n"


def _litserve_table(radar: dict[int, Row], name: str, litserve: dict[int, Row]) -> list[str]:
    lines = [
        "",
        f"**3. Against LitServe**: {name} (same model code, batch and wait; goal: our "
        "throughput ≥ LitServe's at equal or better p99)",
        "",
        "| concurrency | RADAR posts/s | p99 ms | LitServe posts/s | p99 ms | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in sorted(radar):
        ours, theirs = radar[c], litserve.get(c)
        if theirs is None:
            continue
        ok = _ahead_of(ours, theirs)
        lines.append(
            f"| {c} | {_rate(ours)} | {ours['p99_ms']:.0f} | "
            f"{_rate(theirs)} | {theirs['p99_ms']:.0f} | {_verdict(ok)} |"
        )
    return lines


def _sweep_table(radar: dict[int, Row], max_batch: int) -> list[str]:
    lines = [
        "",
        f"**4. Concurrency sweep** (RADAR, max batch {max_batch}; server-side split from "
        "`/metrics`: mean queue wait per post, mean forward per batch)",
        "",
        "| concurrency | posts/s | p50 ms | p99 ms | mean batch | queue wait ms | forward ms "
        "| errors | client CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(radar):
        r = radar[c]
        lines.append(
            f"| {c} | {_rate(r)} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{_num(r.get('mean_batch'))} | {_num(r.get('queue_wait_ms'))} | "
            f"{_num(r.get('forward_ms'))} | {r['errors']:.0f} | {r['client_cpu_pct']:.0f} |"
        )
    return lines


def _latency_goals(
    radar: dict[int, Row], forward: dict[int, Row], max_batch: int, wait_ms: float, top: int
) -> list[str]:
    lines = ["", "| latency goal | bound | measured | verdict |", "|---|---|---|---|"]
    if 1 in radar:
        bound = forward[1]["forward_ms"] + wait_ms + 5
        p50 = radar[1]["p50_ms"]
        lines.append(
            f"| c=1: p50 ≤ forward(batch 1) + max_wait + 5 ms | {bound:.1f} ms | {p50:.1f} ms "
            f"| {_verdict(p50 <= bound)} |"
        )
    if max_batch in radar:
        bound = 2 * forward[max_batch]["forward_ms"] + wait_ms
        p99 = radar[max_batch]["p99_ms"]
        lines.append(
            f"| c={max_batch}: p99 ≤ 2 × forward(batch {max_batch}) + max_wait | {bound:.1f} ms "
            f"| {p99:.1f} ms | {_verdict(p99 <= bound)} |"
        )
    mean_batch = radar[top].get("mean_batch")
    if mean_batch is not None:
        lines.append(
            f"| saturation (c={top}): mean batch ≥ 0.8 × {max_batch} | {0.8 * max_batch:.1f} "
            f"| {mean_batch:.1f} | {_verdict(mean_batch >= 0.8 * max_batch)} |"
        )
    return lines


# Issue 15, item 3's goals, and the figures they are measured against.
INT8_OVER_FP32_GOAL = 2.5
HTTP_OVER_CEILING_GOAL = 0.9
IMAGES_BEFORE, IMAGE_POSTS_BEFORE = 2, 13.0  # posts/s through /route when item 0 was filed
IMAGE_POSTS_GOAL = 3.0


def side_by_side(result: dict[str, Any], max_batch: int) -> str:
    """The side-by-side run's tables (`serving_bench.py --int8-model-dir ...`), one section per
    image count, each goal of issue 15's items 0 and 3 marked met or not."""
    images_counts = sorted({row["images"] for row in result["sweeps"]})
    rounds = result["sweeps"][0].get("rounds", 1)
    lines = [
        f"Figures are medians of {rounds} round(s), servers restarted for every sweep; posts/s "
        "ranges over the rounds in parentheses. Saturation: the highest posts/s of the sweep.",
    ]
    for images in images_counts:
        lines += _side_by_side_section(result, images, max_batch)
    return "\n".join(lines) + "\n"


def _side_by_side_section(result: dict[str, Any], images: int, max_batch: int) -> list[str]:
    ceilings = {
        (row["precision"], row["batch"]): row
        for row in result["inprocess"]
        if row["images"] == images
    }
    servers: dict[str, dict[int, Row]] = {}
    for row in result["sweeps"]:
        if row["images"] == images:
            servers.setdefault(row["server"], {})[row["concurrency"]] = row
    kind = "text posts" if images == 0 else f"posts with {images} image(s)"
    lines = ["", f"**{kind.capitalize()}**", ""]
    lines += [
        "In-process ceilings (`RouterEngine.route`: prepare + forward, one after the other): "
        + "; ".join(
            f"{precision} batch {batch} {row['forward_ms']:.1f} ms = {_rate(row)} posts/s"
            for (precision, batch), row in sorted(ceilings.items())
        )
        + ".",
        "",
    ]
    lines += _side_by_side_table(servers)
    lines += _side_by_side_goals(servers, ceilings, images, max_batch)
    return lines


def _litserves(servers: dict[str, dict[int, Row]]) -> dict[str, dict[int, Row]]:
    return {name: rows for name, rows in servers.items() if name.startswith("litserve")}


def _side_by_side_table(servers: dict[str, dict[int, Row]]) -> list[str]:
    fp32, int8 = servers.get("radar fp32", {}), servers.get("radar int8", {})
    litserves = _litserves(servers)
    header = "| concurrency | RADAR fp32 posts/s | p50 / p99 ms | RADAR int8 posts/s | p50 / p99 ms"
    rule = "|---|---|---|---|---"
    for name in litserves:
        header += f" | {name} posts/s | p50 / p99 ms | RADAR int8 ahead, p99 ≤"
        rule += "|---|---|---"
    lines = [header + " |", rule + "|"]
    for c in sorted(int8 or fp32):
        cells = [str(c)]
        for rows in (fp32, int8):
            row = rows.get(c)
            cells += [_rate(row), _latencies(row)] if row else ["–"] * 2
        for rows in litserves.values():
            theirs, ours = rows.get(c), int8.get(c)
            if theirs is None or ours is None:
                cells += ["–"] * 3
            else:
                cells += [_rate(theirs), _latencies(theirs), _verdict(_ahead_of(ours, theirs))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _side_by_side_goals(
    servers: dict[str, dict[int, Row]],
    ceilings: dict[tuple[str, int], Row],
    images: int,
    max_batch: int,
) -> list[str]:
    fp32, int8 = servers.get("radar fp32", {}), servers.get("radar int8", {})
    ahead = [
        _ahead_of(int8[c], rows[c])
        for rows in _litserves(servers).values()
        for c in sorted(int8)
        if c in rows
    ]
    lines = ["", "| goal | measured | verdict |", "|---|---|---|"]
    top_fp32 = max((r["posts_per_s"] for r in fp32.values()), default=None)
    top_int8 = max((r["posts_per_s"] for r in int8.values()), default=None)
    if top_fp32 and top_int8:
        ratio = top_int8 / top_fp32
        lines.append(
            f"| int8 `/route` ≥ {INT8_OVER_FP32_GOAL}× fp32 `/route` at saturation | "
            f"{top_int8:.1f} / {top_fp32:.1f} = {ratio:.2f}× | "
            f"{_verdict(ratio >= INT8_OVER_FP32_GOAL)} |"
        )
    ceiling = ceilings.get(("int8", max_batch))
    if top_int8 and ceiling:
        ratio = top_int8 / ceiling["posts_per_s"]
        lines.append(
            f"| int8 `/route` ≥ {HTTP_OVER_CEILING_GOAL}× the int8 in-process ceiling (batch "
            f"{max_batch}) | {top_int8:.1f} / {ceiling['posts_per_s']:.1f} = {ratio:.2f}× | "
            f"{_verdict(ratio >= HTTP_OVER_CEILING_GOAL)} |"
        )
    if ahead:
        lines.append(
            f"| RADAR int8 ahead of LitServe (int8) at every concurrency, p99 equal or better | "
            f"{sum(ahead)} of {len(ahead)} | {_verdict(all(ahead))} |"
        )
    for precision in ("fp32", "int8"):
        one, batch = ceilings.get((precision, 1)), ceilings.get((precision, max_batch))
        if one and batch:
            ok = batch["posts_per_s"] >= one["posts_per_s"]
            lines.append(
                f"| {precision}: a batch of {max_batch} no slower per post than one post "
                f"(in process) | {batch['posts_per_s']:.1f} vs {one['posts_per_s']:.1f} "
                f"posts/s | {_verdict(ok)} |"
            )
    if images == IMAGES_BEFORE and top_fp32:
        for precision, top in (("fp32", top_fp32), ("int8", top_int8)):
            if top is None:
                continue
            goal = IMAGE_POSTS_GOAL * IMAGE_POSTS_BEFORE
            lines.append(
                f"| {precision}: image posts ≥ {IMAGE_POSTS_GOAL:g}× the {IMAGE_POSTS_BEFORE:g} "
                f"posts/s `/route` gave when issue 15 was filed | "
                f"{top:.1f} posts/s = {top / IMAGE_POSTS_BEFORE:.2f}× | {_verdict(top >= goal)} |"
            )
    return lines
