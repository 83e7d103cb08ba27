"""`radar quality plan`: the audit rate the recall gauge needs, the time it takes at a rate,
and the load the audits add to the verticals (`app/feedback/audit_plan.py`), from the
decision log's traffic or from figures given. No model is loaded."""

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.feedback.audit_plan import CategoryPlan, Traffic

DEFAULT_RECALL = 0.9  # the shipped files' recall target
DEFAULT_WIDTH = 0.10  # recall known to about ± 0.05


class _Refused(Exception):
    """Input the command cannot plan from; printed after `radar quality plan: `."""


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What the command line gives besides the traffic."""

    pass_rates: dict[str, float]  # --pass-rate
    prevalences: dict[str, float]  # --prevalence
    provenance: dict[str, tuple[float | None, float | None]]  # --thresholds: (pass, base rate)
    rate: float | None  # --rate


@dataclasses.dataclass(frozen=True)
class _Figures:
    """One category's inputs and where each came from: log, given, file or default."""

    traffic: "Traffic"
    pass_from: str
    prevalence_from: str
    rate: float
    rate_from: str


def _plan(args: argparse.Namespace) -> int:
    from app.feedback.audit_plan import PlanError, check_target, plan

    try:
        window = args.window_hours
        if window is None:
            window = _setting("quality_window_hours")
        check_target(args.recall, args.width, window, 0.0 if args.rate is None else args.rate)
        inputs = _Inputs(
            _pairs("--pass-rate", args.pass_rate),
            _pairs("--prevalence", args.prevalence),
            _provenance(args.thresholds),
            args.rate,
        )
        if args.posts_per_hour is not None:
            if args.log is not None or args.since_hours is not None:
                raise _Refused("--posts-per-hour gives the traffic: drop --log / --since-hours")
            source, figures, skipped = _given(args.posts_per_hour, inputs)
        else:
            source, figures, skipped = _from_log(args.log, args.since_hours, args.recall, inputs)
    except (_Refused, PlanError) as exc:
        print(f"radar quality plan: {exc}", file=sys.stderr)
        return 2
    plans: dict[str, CategoryPlan] = {}
    for name, f in figures.items():
        try:
            plans[name] = plan(
                f.traffic, recall=args.recall, width=args.width, window_hours=window, rate=f.rate
            )
        except PlanError as exc:
            skipped[name] = str(exc)
    if args.json:
        out = {
            "traffic": source,
            "target": {"width": args.width, "recall": args.recall, "window_hours": window},
            "categories": {
                name: dataclasses.asdict(p) | _sources(figures[name]) for name, p in plans.items()
            },
            "skipped": skipped,
        }
        print(json.dumps(out, indent=2))
    else:
        print(render_plan(source, args.recall, args.width, window, plans, figures))
    for name, reason in skipped.items():
        print(f"radar quality plan: {name} not planned: {reason}", file=sys.stderr)
    return 0 if plans else 2


def _given(
    posts_per_hour: float, inputs: _Inputs
) -> tuple[dict[str, Any], dict[str, _Figures], dict[str, str]]:
    """Traffic from the command line, completed from the thresholds file's provenance."""
    from app.feedback.audit_plan import Traffic

    names = list(inputs.provenance) or list(inputs.pass_rates)
    if not names:
        raise _Refused("--posts-per-hour needs the categories: --pass-rate CAT=R or --thresholds")
    _known(names, inputs.pass_rates, "--pass-rate", "--thresholds file's")
    _known(names, inputs.prevalences, "--prevalence", "planned")
    rate, rate_from = (inputs.rate, "given") if inputs.rate is not None else _default_rate()
    figures, skipped = {}, {}
    for name in names:
        from_file = inputs.provenance.get(name, (None, None))
        pass_rate, pass_from = _first(
            (inputs.pass_rates.get(name), "given"), (from_file[0], "file")
        )
        prevalence, prevalence_from = _first(
            (inputs.prevalences.get(name), "given"), (from_file[1], "file")
        )
        if pass_rate is None or prevalence is None:
            flag = "--pass-rate" if pass_rate is None else "--prevalence"
            skipped[name] = f"no {flag[2:]} given or in a thresholds file: {flag} {name}=X"
            continue
        traffic = Traffic(name, posts_per_hour, pass_rate, prevalence)
        figures[name] = _Figures(traffic, pass_from, prevalence_from, rate, rate_from)
    return {"source": "given", "posts_per_hour": posts_per_hour}, figures, skipped


def _from_log(
    location: str | None, since_hours: float | None, recall: float, inputs: _Inputs
) -> tuple[dict[str, Any], dict[str, _Figures], dict[str, str]]:
    """Traffic measured in the decision log; given figures override the measured ones."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.cli_ops import default_log_location
    from app.feedback.audit_plan import Traffic, measure_traffic, prevalence_from_hits
    from app.feedback.schema import (
        LogLocationError,
        describe,
        driver_message,
        is_database_url,
        open_log,
    )

    location = location or default_log_location()
    try:
        where = describe(location)
    except LogLocationError as exc:
        raise _Refused(f"--log: {exc}") from None
    if not is_database_url(location) and not Path(location).is_file():
        raise _Refused(f"no decision log at {location} (--log, or give --posts-per-hour)")
    if since_hours is not None and not since_hours > 0:
        raise _Refused("--since-hours must be > 0")
    since = None if since_hours is None else time.time() - 3600 * since_hours
    try:
        engine = open_log(location, readonly=True)
        try:
            with engine.connect() as conn:
                window = measure_traffic(conn, since)
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        reason = driver_message(exc)
        raise _Refused(f"{where} is not a readable decision log: {reason}") from None
    names = list(window.categories)
    _known(names, inputs.pass_rates, "--pass-rate", "log's")
    _known(names, inputs.prevalences, "--prevalence", "log's")
    figures = {}
    skipped = {}
    for name, logged in window.categories.items():
        posts_per_hour = window.posts_per_hour(name)
        measured_base = None
        if logged.dispatched_violating > 0:
            hits = window.hits_per_hour(name)
            measured_base = prevalence_from_hits(hits, posts_per_hour, recall)
        from_file = inputs.provenance.get(name, (None, None))
        pass_rate, pass_from = _first(
            (inputs.pass_rates.get(name), "given"), (window.pass_rate(name), "log")
        )
        prevalence, prevalence_from = _first(
            (inputs.prevalences.get(name), "given"), (measured_base, "log"), (from_file[1], "file")
        )
        if pass_rate is None or prevalence is None:
            skipped[name] = (
                "no dispatched violating verdicts in the log to measure its base rate from: "
                f"--prevalence {name}=P (share of posts violating), or --thresholds FILE"
            )
            continue
        if inputs.rate is not None:
            rate, rate_from = inputs.rate, "given"
        elif logged.audit_rate is not None:
            rate, rate_from = logged.audit_rate, "log"
        else:
            rate, rate_from = _default_rate()
        traffic = Traffic(name, posts_per_hour, pass_rate, prevalence)
        figures[name] = _Figures(traffic, pass_from, prevalence_from, rate, rate_from)
    source = {"source": "log", "log": where, "since": since, "hours": window.hours}
    return source, figures, skipped


def _pairs(flag: str, items: list[str] | None) -> dict[str, float]:
    """`CAT=R` arguments as {category: R}, each R in [0, 1]."""
    found: dict[str, float] = {}
    for item in items or []:
        name, sep, number = item.partition("=")
        try:
            share = float(number) if sep and name else math.nan
        except ValueError:
            share = math.nan
        if not 0 <= share <= 1:  # NaN included
            raise _Refused(f"{flag} {item!r}: expected CATEGORY=R with R a share in [0, 1]")
        if name in found:
            raise _Refused(f"{flag}: {name!r} given twice")
        found[name] = share
    return found


def _known(names: list[str], given: dict[str, float], flag: str, whose: str) -> None:
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise _Refused(f"{flag}: unknown categories {unknown}; the {whose} categories: {names}")


def _first(*candidates: tuple[float | None, str]) -> tuple[float | None, str]:
    """The first value that is not None, and where it came from."""
    return next(((v, origin) for v, origin in candidates if v is not None), (None, ""))


def _provenance(path: Path | None) -> dict[str, tuple[float | None, float | None]]:
    """Per category, the thresholds file's expected pass rate, and the share of positives
    among its annotated calibration posts (a stand-in for the base rate: real traffic may
    hold far fewer)."""
    from app.thresholds import ThresholdsError, parse_thresholds

    if path is None:
        return {}
    try:
        file = parse_thresholds(path.read_bytes(), str(path))
    except OSError as exc:
        raise _Refused(f"cannot read {path}: {exc.strerror}") from None
    except ThresholdsError as exc:
        raise _Refused(f"thresholds refused ({exc.reason}): {exc}") from None
    found = {}
    for name, c in file.categories.items():
        base = c.n_positive / c.n_annotated if c.n_positive and c.n_annotated else None
        found[name] = (c.expected_auto_pass_rate, base)
    return found


def _setting(name: str) -> float:
    """A number the service takes from RADAR_<NAME>, else its default (app.service.settings)."""
    variable = f"RADAR_{name.upper()}"
    if os.environ.get(variable):
        try:
            return float(os.environ[variable])
        except ValueError:
            raise _Refused(f"{variable}={os.environ[variable]!r} is not a number") from None
    from app.service.settings import Settings

    return float(Settings.model_fields[name].default)


def _default_rate() -> tuple[float, str]:
    return _setting("audit_rate"), "default"


def _sources(f: _Figures) -> dict[str, str]:
    return {
        "pass_from": f.pass_from,
        "prevalence_from": f.prevalence_from,
        "rate_from": f.rate_from,
    }


def _hours(h: float | None) -> str:
    if h is None:
        return "never"
    return f"{h:.1f} h" if h < 72 else f"{h / 24:.1f} d"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_plan(
    source: dict[str, Any],
    recall: float,
    width: float,
    window: float,
    plans: dict[str, "CategoryPlan"],
    figures: dict[str, _Figures],
) -> str:
    """Two tables: what the target needs, and what the audit rate in force (or --rate) gives."""
    if source["source"] == "log":
        since = source["since"]
        start = (
            ""
            if since is None
            else f" since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))}"
        )
        traffic = f"decision log {source['log']}{start}: {source['hours']:.1f} h of decisions"
    else:
        traffic = f"{source['posts_per_hour']:g} posts/h, given"
    lines = [
        f"audit plan: a 95% recall interval at most {width:g} wide, at an assumed recall of "
        f"{recall:g}",
        f"traffic: {traffic}; the gauge's window: {window:g} h",
        "",
        f"needed: audited released posts (at least {_min_audited()}: the gauge is NaN "
        "below), and the audit rate",
        "that gathers them within the window",
        f"{'category':<12} {'posts/h':>9} {'pass':>6} {'base rate':>14} {'misses/h':>9} "
        f"{'audits':>8} {'misses':>7} {'rate':>8} {'audits/h':>9} {'+load':>7}",
    ]
    for name, p in plans.items():
        f = figures[name]
        base = f"{_pct(p.prevalence)} ({f.prevalence_from})"
        rate = f"{p.rate_needed:.4f}" if p.rate_needed is not None else "over 1"
        per_hour = "-" if p.audits_per_hour_needed is None else f"{p.audits_per_hour_needed:.1f}"
        lines.append(
            f"{name:<12} {p.posts_per_hour:>9.1f} {_pct(p.pass_rate):>6} {base:>14} "
            f"{p.misses_per_hour:>9.2f} {p.audited_needed:>8} {p.misses_seen_needed:>7.1f} "
            f"{rate:>8} {per_hour:>9} {_pct(p.extra_load_needed):>7}"
        )
    short = [f"{n}: {_hours(p.shortest_hours)}" for n, p in plans.items() if p.rate_needed is None]
    if short:
        lines += textwrap.wrap(
            f"over 1: {window:g} h of traffic holds too few released posts; auditing all of "
            f"them takes {', '.join(short)} (a longer RADAR_QUALITY_WINDOW_HOURS, or a wider "
            "--width)",
            width=100,
            break_on_hyphens=False,
        )
    lines += [
        "",
        "at the audit rate in force (log), given (--rate) or the default: time to the "
        "gauge's first",
        "value, and to the target width; audits in window: what it holds, of those needed",
        f"{'category':<12} {'rate':>16} {'audits/h':>9} {'+load':>7} {'gauge after':>12} "
        f"{'width after':>12} {'audits in window':>17}",
    ]
    for name, p in plans.items():
        rate = f"{p.rate:.4f} ({figures[name].rate_from})"
        held = f"{p.audited_in_window:.0f}" + (
            "" if p.reached_in_window else f" of {p.audited_needed}"
        )
        lines.append(
            f"{name:<12} {rate:>16} {p.audits_per_hour:>9.1f} {_pct(p.extra_load):>7} "
            f"{_hours(p.hours_to_gauge):>12} {_hours(p.hours_needed):>12} {held:>17}"
        )
    lines += [
        "",
        "pass: share released (only released posts are audited); misses/h: released violating",
        "posts at the assumed recall; audits: audited posts needed; misses: audited misses",
        "expected among them; +load: audits / posts the router dispatches to that vertical.",
    ]
    return "\n".join(lines)


def _min_audited() -> int:
    from app.feedback.audit_plan import MIN_AUDITED

    return MIN_AUDITED


_DESCRIPTION = textwrap.fill(
    "Plan the audit rate (RADAR_AUDIT_RATE / RADAR_AUDIT_RATES). Recall is estimated from "
    "audited released posts, so its 95 % interval narrows only as audited misses accumulate, "
    "and the gauge is NaN below 30 audited verdicts in its window. Per category: the audited "
    "posts a 95 % interval at most --width wide needs at an assumed --recall (searched with "
    "the service's own interval), the rate that gathers them within the gauge's window, the "
    "time they take at the rate in force (or --rate), and the extra posts the audits send to "
    "the vertical. The traffic is measured in the decision log (posts per hour, share "
    "released, and the base rate from the dispatched posts' verdicts), or given with "
    "--posts-per-hour. Exit 0, or 2 when nothing can be planned (the reason on stderr).",
    width=88,
    break_on_hyphens=False,
)
_EXAMPLES = """examples:
  radar quality plan --log data/decision_log.sqlite3 --since-hours 24
  radar quality plan --posts-per-hour 2000 --thresholds thresholds/proxy.yaml \\
      --prevalence hate=0.02 toxic=0.03 --width 0.1 --rate 0.05"""


def add_plan_command(actions: Any) -> None:
    """`radar quality plan`, on `radar quality`'s subparsers."""
    plan = actions.add_parser(
        "plan",
        help="the audit rate the recall gauge needs, the time it takes, the load it adds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
    )
    plan.add_argument(
        "--log",
        metavar="PATH|URL",
        help="decision log to measure the traffic in (default: the service's, as for "
        "`radar quality`)",
    )
    plan.add_argument(
        "--since-hours",
        type=float,
        metavar="H",
        help="measure over the log's last H hours (default: the whole log)",
    )
    plan.add_argument(
        "--posts-per-hour",
        type=float,
        metavar="N",
        help="posts routed per hour: plan from given figures instead of the log (categories "
        "from --pass-rate or --thresholds)",
    )
    plan.add_argument(
        "--pass-rate",
        action="extend",
        nargs="+",
        metavar="CAT=R",
        help="share of the category's decisions released (not dispatched); overrides the "
        "log's or the thresholds file's",
    )
    plan.add_argument(
        "--prevalence",
        action="extend",
        nargs="+",
        metavar="CAT=P",
        help="share of all posts that violate the category (its base rate); default: from "
        "the log's dispatched verdicts at the assumed recall, else the thresholds file's "
        "calibration data (n_positive / n_annotated, usually far above live traffic's)",
    )
    plan.add_argument(
        "--thresholds",
        type=Path,
        metavar="FILE",
        help="thresholds YAML whose provenance gives pass rates (expected_auto_pass_rate) and "
        "base rates where neither the log nor a flag does",
    )
    plan.add_argument(
        "--recall",
        type=float,
        default=DEFAULT_RECALL,
        metavar="R",
        help=f"assumed recall, in (0, 1) (default {DEFAULT_RECALL}: the shipped target)",
    )
    plan.add_argument(
        "--width",
        type=float,
        default=DEFAULT_WIDTH,
        metavar="W",
        help=f"target width (high - low) of the 95 %% recall interval, in (0, 1) (default "
        f"{DEFAULT_WIDTH}: about ± {DEFAULT_WIDTH / 2:g})",
    )
    plan.add_argument(
        "--rate",
        type=float,
        metavar="A",
        help="audit rate to report the time for, in [0, 1] (default: the rate the log "
        "records per category, else $RADAR_AUDIT_RATE or 0.01)",
    )
    plan.add_argument(
        "--window-hours",
        type=float,
        metavar="H",
        help="the gauge's window (default: $RADAR_QUALITY_WINDOW_HOURS, else 24)",
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plan.set_defaults(handler=_plan)
