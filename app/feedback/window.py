"""Which decisions an online estimate reads: since when, and under which thresholds version.

After a promotion the log holds the old thresholds' decisions beside the new ones, and over
a 24 h window the old ones outnumber the new for hours: an estimate over all of them says
little about the thresholds now deciding. Every decision row carries the `thresholds_version`
that made it, so an estimate can read one version only (`radar quality --thresholds-version`,
the service's gauges for the active version), from an absolute time or a relative one
(`radar quality --since`).
"""

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, text


class WindowError(ValueError):
    """A time or version that selects no well-defined set of decisions; the message says why."""


@dataclass(frozen=True)
class VersionSpan:
    """One thresholds version's decisions in the log: how many, first and last (Unix s)."""

    version: str | None  # None: rows written without a version
    decisions: int  # (post, category) rows
    first: float
    last: float


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(value: str, now: float) -> float:
    """Unix seconds from `value`: an ISO-8601 time (`2026-12-01T10:00:00Z`, `2026-12-01
    10:00+01:00`, `2026-12-01`; without a zone it is UTC, the zone the log's times are
    compared in) or a duration before `now` (`90m`, `6h`, `2d`)."""
    value = value.strip()
    duration = _DURATION.fullmatch(value)
    if duration:
        return now - float(duration.group(1)) * _UNIT_S[duration.group(2)]
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise WindowError(
            f"not an ISO-8601 time or a duration: {value!r} "
            "(e.g. 2026-12-01T10:00:00Z, 2026-12-01, or 6h, 90m, 2d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def iso(seconds: float) -> str:
    """Unix seconds as an ISO-8601 UTC time, to the second."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def thresholds_versions(conn: Connection, since: float | None = None) -> list[VersionSpan]:
    """The thresholds versions of the decisions at or after `since`, oldest first."""
    rows = conn.execute(
        text(
            "SELECT thresholds_version, COUNT(*), MIN(decided_at), MAX(decided_at) "
            "FROM decisions WHERE decided_at >= :since GROUP BY thresholds_version "
            "ORDER BY MIN(decided_at)"
        ),
        {"since": float("-inf") if since is None else since},
    )
    return [VersionSpan(r[0], int(r[1]), float(r[2]), float(r[3])) for r in rows]


def describe_versions(spans: Sequence[VersionSpan]) -> str:
    """`v1 (1,200 decisions, 2026-12-01T10:00:00Z to ...), v2 (...)`, or `none`."""
    if not spans:
        return "none"
    return ", ".join(
        f"{s.version or '(no version)'} ({s.decisions:,} decisions, "
        f"{iso(s.first)} to {iso(s.last)})"
        for s in spans
    )
