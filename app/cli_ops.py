"""`radar thresholds` and `radar quality`: the operator's commands (no model weights
loaded): check, compare and promote thresholds files; read online quality from the
decision log."""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from app.cli_audit_plan import add_plan_command


def _thresholds_validate(args: argparse.Namespace) -> int:
    from app.thresholds import ThresholdsError
    from app.thresholds_tools import validate

    try:
        print(validate(args.file, args.model))
    except ThresholdsError as exc:
        print(f"radar thresholds validate: refused ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    return 0


def _thresholds_diff(args: argparse.Namespace) -> int:
    from app.thresholds import ThresholdsError
    from app.thresholds_tools import diff, model_reference, read_thresholds, render_diff

    try:
        reference = model_reference(args.model) if args.model is not None else None
        d = diff(read_thresholds(args.a), read_thresholds(args.b), reference)
    except ThresholdsError as exc:
        print(f"radar thresholds diff: cannot read ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    print(json.dumps(d, indent=2) if args.json else render_diff(d))
    return 0


def _thresholds_promote(args: argparse.Namespace) -> int:
    from app.thresholds import ThresholdsError
    from app.thresholds_tools import PromoteError, promote, render_diff

    try:
        done = promote(args.file, args.to, args.model, dry_run=args.dry_run)
    except ThresholdsError as exc:
        print(f"radar thresholds promote: refused ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    except PromoteError as exc:
        print(f"radar thresholds promote: refused: {exc}", file=sys.stderr)
        return 1
    for warning in done.warnings:
        print(f"radar thresholds promote: warning: {warning}", file=sys.stderr)
    if done.diff is not None:
        print(render_diff(done.diff) + "\n")
    old = done.old_version or "none"
    if done.unchanged:
        print(f"{args.to} already holds {args.file} (version {done.new_version}): nothing to do")
    elif args.dry_run:
        print(f"dry run: would promote {args.file} to {args.to}: {old} -> {done.new_version}")
    else:
        print(f"promoted {args.file} to {args.to}: {old} -> {done.new_version}")
    return 0


def _add_thresholds_commands(commands: Any) -> None:
    """`radar thresholds validate | diff | promote`: no model weights are loaded."""
    thresholds = commands.add_parser(
        "thresholds",
        help="validate, diff and promote thresholds YAML files (no model loaded)",
        description="Check thresholds files with the service's own checks, compare two, and "
        "install one over the active file atomically. --model reads only the store's "
        "router.json. Exit status: 0 done, 1 refused, 2 unusable --model or arguments.",
    )
    sub = thresholds.add_subparsers(dest="thresholds_command", required=True, metavar="ACTION")
    model_help = "model-store directory whose categories and model_version the file must fit"

    validate = sub.add_parser(
        "validate",
        help="check a file: schema, and with --model its categories and model_version",
        description="Parse FILE with the service's schema and, with --model, check it has "
        "exactly the model's categories and its model_version. Prints 'OK <version>: N "
        "categories' (exit 0) or the refusal reason and problem (exit 1).",
    )
    validate.add_argument("file", metavar="FILE", type=Path, help="thresholds YAML to check")
    validate.add_argument("--model", type=Path, help=model_help)
    validate.set_defaults(handler=_thresholds_validate)

    diff = sub.add_parser(
        "diff",
        help="per category: tau in A and B, the change, expected auto-pass rates",
        description="Compare two thresholds files per category: tau in A, tau in B, the "
        "change and, where the files carry calibration provenance, each expected auto-pass "
        "rate; categories in only one file are flagged. With --model, also whether each file "
        "fits that model. Exit 0 (1 when a file cannot be read or parsed).",
    )
    diff.add_argument("a", metavar="A", type=Path, help="thresholds YAML (e.g. the active one)")
    diff.add_argument("b", metavar="B", type=Path, help="thresholds YAML (e.g. the candidate)")
    diff.add_argument("--model", type=Path, help=model_help)
    diff.add_argument("--json", action="store_true", help="print JSON instead of a table")
    diff.set_defaults(handler=_thresholds_diff)

    promote = sub.add_parser(
        "promote",
        help="check a file and install it over the active one atomically",
        description="Check FILE (against --model, else against the categories and "
        "model_version of the valid file at ACTIVE_PATH, else the schema only), then copy it "
        "to a temporary file beside ACTIVE_PATH, fsync it and rename it over ACTIVE_PATH, so "
        "a running service's hot reload sees one complete file. Refused (exit 1, ACTIVE_PATH "
        "untouched) when FILE is invalid, has another model_version than the active file, "
        "reuses the active version with other content, or the directory is not writable.",
    )
    promote.add_argument("file", metavar="FILE", type=Path, help="thresholds YAML to install")
    promote.add_argument(
        "--to",
        metavar="ACTIVE_PATH",
        type=Path,
        required=True,
        help="the file the service reads (RADAR_THRESHOLDS_PATH)",
    )
    promote.add_argument("--model", type=Path, help=model_help)
    promote.add_argument(
        "--dry-run", action="store_true", help="check and print the diff; change nothing"
    )
    promote.set_defaults(handler=_thresholds_promote)


def _quality(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from sqlalchemy.exc import SQLAlchemyError

    from app.feedback.quality import estimate_quality, render_quality
    from app.feedback.schema import (
        LogLocationError,
        describe,
        driver_message,
        is_database_url,
        open_log,
    )
    from app.feedback.window import (
        WindowError,
        describe_versions,
        iso,
        parse_since,
        thresholds_versions,
    )
    from app.thresholds import ThresholdsError, parse_thresholds

    location = args.log or default_log_location()
    try:
        where = describe(location)
    except LogLocationError as exc:
        print(f"radar quality: --log: {exc}", file=sys.stderr)
        return 2
    if not is_database_url(location) and not Path(location).is_file():
        print(f"radar quality: no decision log at {location}", file=sys.stderr)
        return 2
    if args.since_hours is not None and args.since_hours <= 0:
        print("radar quality: --since-hours must be > 0", file=sys.stderr)
        return 2
    candidate = None
    if args.thresholds is not None:
        try:
            candidate = parse_thresholds(args.thresholds.read_bytes(), str(args.thresholds))
        except OSError as exc:
            print(f"radar quality: cannot read {args.thresholds}: {exc.strerror}", file=sys.stderr)
            return 2
        except ThresholdsError as exc:
            print(f"radar quality: thresholds refused ({exc.reason}): {exc}", file=sys.stderr)
            return 2
    since = None if args.since_hours is None else time.time() - 3600 * args.since_hours
    if args.since is not None:
        try:
            since = parse_since(args.since, time.time())
        except WindowError as exc:
            print(f"radar quality: --since: {exc}", file=sys.stderr)
            return 2
    version = args.thresholds_version
    try:
        engine = open_log(location, readonly=True)
        try:
            with engine.connect() as conn:
                spans = thresholds_versions(conn) if version is not None else []
                if version is not None and version not in {s.version for s in spans}:
                    print(
                        f"radar quality: --thresholds-version: no decisions under {version!r} "
                        f"in {where}; its versions: {describe_versions(spans)}",
                        file=sys.stderr,
                    )
                    return 2
                taken = estimate_quality(conn, since=since, thresholds_version=version)
                under = None
                if candidate is not None:  # both tables over the log's and the file's categories
                    names = sorted(set(taken) | set(candidate.categories))
                    taus = {name: c.tau for name, c in candidate.categories.items()}
                    under = estimate_quality(conn, names, taus, since, thresholds_version=version)
                    # A file's category the log never saw has zero counts under any rule: no
                    # second pass over the log to say so for the decisions taken.
                    taken = {
                        name: taken.get(name) or dataclasses.replace(under[name], tau=None)
                        for name in names
                    }
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        reason = driver_message(exc)
        print(f"radar quality: {where} is not a readable decision log: {reason}", file=sys.stderr)
        return 2
    if args.json:

        def as_dicts(results: dict[str, Any]) -> dict[str, Any]:
            return {name: dataclasses.asdict(q) for name, q in results.items()}

        out: dict[str, Any] = {"log": where, "since": since, "thresholds_version": version}
        out["taken"] = as_dicts(taken)
        if candidate is not None and under is not None:
            out["candidate"] = {
                "file": str(args.thresholds),
                "version": candidate.version,
                "categories": as_dicts(under),
            }
        print(json.dumps(out, indent=2))
        return 0
    window = "" if since is None else f", since {iso(since)}"
    window += "" if version is None else f", thresholds version {version}"
    print(render_quality(taken, f"decisions taken ({where}{window}):"))
    if candidate is not None and under is not None:
        title = f"under {args.thresholds} (version {candidate.version}{window}):"
        print("\n" + render_quality(under, title))
    return 0


def default_log_location() -> str:
    """The service's own choice of log (`app.service.settings`), from the environment."""
    for name in ("RADAR_DECISION_LOG_URL", "RADAR_DECISION_LOG_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    from app.service.settings import Settings

    return str(Settings.model_fields["decision_log_path"].default)


def _add_quality_command(commands: Any) -> None:
    """`radar quality`: IPW recall / precision from the decision log (no model loaded)."""
    quality = commands.add_parser(
        "quality",
        help="online recall and precision per category from the decision log and verdicts",
        description="Estimate, per category, the recall and precision of dispatch from the "
        "verticals' verdicts in the decision log, weighting each audited verdict by 1 / its "
        "audit rate (inverse-probability weighting), so released posts never judged are "
        "accounted for. Recall is '-' without audited verdicts. With --thresholds, also what "
        "that file's taus (e.g. a candidate) would have achieved on the same decisions. "
        "Exit 0, or 2 when the log or the thresholds file cannot be read.",
    )
    quality.add_argument(
        "--log",
        metavar="PATH|URL",
        help="decision log: an SQLite file or a database URL (postgresql://user@host/db); "
        "default: $RADAR_DECISION_LOG_URL, else $RADAR_DECISION_LOG_PATH, else "
        "data/decision_log.sqlite3, as the service (a URL in the environment keeps its "
        "password out of the process list)",
    )
    quality.add_argument(
        "--thresholds",
        type=Path,
        metavar="FILE",
        help="thresholds YAML whose taus to evaluate as well (e.g. a candidate)",
    )
    when = quality.add_mutually_exclusive_group()
    when.add_argument(
        "--since-hours",
        type=float,
        metavar="H",
        help="only decisions of the last H hours (default: the whole log)",
    )
    when.add_argument(
        "--since",
        metavar="TIME",
        help="only decisions at or after TIME: ISO-8601 (2026-12-01T10:00:00Z; UTC without a "
        "zone) or a duration before now (90m, 6h, 2d), e.g. the time of a promotion",
    )
    quality.add_argument(
        "--thresholds-version",
        metavar="V",
        help="only decisions made under thresholds version V (e.g. the one just promoted: "
        "the old version's decisions would dominate the window for hours); an unknown V "
        "exits 2 and names the versions the log has",
    )
    quality.add_argument("--json", action="store_true", help="print JSON instead of tables")
    quality.set_defaults(handler=_quality)
    # `radar quality plan` (optional: `radar quality` alone estimates, as before).
    actions = quality.add_subparsers(
        dest="quality_command", metavar="[plan]", title="action (optional)"
    )
    add_plan_command(actions)


def add_operations_commands(commands: Any) -> None:
    """Register `thresholds` and `quality` on the `radar` command's subparsers."""
    _add_thresholds_commands(commands)
    _add_quality_command(commands)
