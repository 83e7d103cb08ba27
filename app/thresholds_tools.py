"""`radar thresholds validate | diff | promote`: check and install thresholds files offline.

The schema and the checks are app/thresholds.py's, the very ones the service's hot reload
runs, so a file that passes `validate --model DIR` is one the service on DIR accepts. A model
store is only read for its router.json (categories, model_version): no weights are loaded.

`promote` installs a file the way the service wants to see it change: the bytes go to a
temporary file in the target's directory, fsynced, then renamed over the target
(`app.thresholds.write_atomically`, shared with `radar calibrate`), so a poll sees the old or
the whole new file, never a part. Every refusal leaves the target as it was.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.thresholds import (
    ThresholdsError,
    ThresholdsFile,
    edited_since_calibration,
    parse_thresholds,
    provenance_rate,
    read_thresholds_file,
    validate_for_model,
    write_atomically,
)


class PromoteError(Exception):
    """`promote` refused for a reason beyond the file's own checks (version clash, target)."""


@dataclass(frozen=True)
class Loaded:
    """One thresholds file as read: its exact bytes and its parsed document."""

    path: Path
    raw: bytes
    file: ThresholdsFile

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True)
class Reference:
    """What a file must fit: a model's categories and model_version, and where they came from."""

    categories: tuple[str, ...]
    model_version: str
    origin: str
    from_active: bool = False


@dataclass(frozen=True)
class Promotion:
    """What `promote` did (or, with `dry_run`, would do)."""

    old_version: str | None
    new_version: str
    diff: dict[str, Any] | None  # against the active file; None when there is none
    unchanged: bool  # the active file already holds these bytes: nothing to install
    warnings: tuple[str, ...] = ()


def read_thresholds(path: Path) -> Loaded:
    """Read and parse `path` against the schema; every failure is a `ThresholdsError`."""
    raw = read_thresholds_file(path)
    return Loaded(Path(path), raw, parse_thresholds(raw, str(path)))


def model_reference(model_dir: Path) -> Reference:
    """The categories and model_version of a model store, from its router.json alone."""
    from app.model.config import read_config

    config = read_config(Path(model_dir))
    return Reference(config.categories, config.model_version, f"model store {model_dir}")


def active_reference(active: Loaded) -> Reference:
    origin = f"active file {active.path} (version {active.file.version})"
    categories = tuple(active.file.categories)
    return Reference(categories, active.file.model_version, origin, from_active=True)


def check(loaded: Loaded, reference: Reference | None) -> None:
    """The service's checks beyond the schema: the same categories and model_version."""
    if reference is None:
        return
    file, source = loaded.file, str(loaded.path)
    if reference.from_active and file.model_version != reference.model_version:
        raise ThresholdsError(
            "model_version",
            source,
            f"model_version {file.model_version!r} differs from the {reference.origin}'s "
            f"{reference.model_version!r}: the running service would refuse it (for a new "
            "model, pass --model DIR of its model store)",
        )
    try:
        validate_for_model(file, reference.categories, reference.model_version, source, "")
    except ThresholdsError as exc:
        problem = f"{exc.problem} (checked against the {reference.origin})"
        raise ThresholdsError(exc.reason, source, problem) from None


def validate(path: Path, model_dir: Path | None) -> str:
    """Check `path` (against `model_dir` when given); the OK line, or a `ThresholdsError`."""
    reference = model_reference(model_dir) if model_dir is not None else None
    loaded = read_thresholds(path)
    check(loaded, reference)
    scope = f"fits {reference.origin}" if reference else "schema only: no --model"
    return f"OK {loaded.file.version}: {len(loaded.file.categories)} categories ({scope})"


def _side(loaded: Loaded, reference: Reference | None) -> dict[str, Any]:
    calibration = loaded.file.calibration or {}
    side: dict[str, Any] = {
        "path": str(loaded.path),
        "version": loaded.file.version,
        "model_version": loaded.file.model_version,
        "expected_overall_auto_pass_rate": provenance_rate(
            calibration.get("expected_overall_auto_pass_rate")
        ),
        # Categories whose tau changed after the rates were measured (None: not recorded).
        "edited_since_calibration": edited_since_calibration(loaded.file),
        "refusal": None,
    }
    try:
        check(loaded, reference)
    except ThresholdsError as exc:
        side["refusal"] = {"reason": exc.reason, "problem": exc.problem}
    return side


def diff(a: Loaded, b: Loaded, reference: Reference | None = None) -> dict[str, Any]:
    """Per category τ and expected auto-pass rate in A and in B; `refusal`s against `reference`."""
    names = [*a.file.categories, *(n for n in b.file.categories if n not in a.file.categories)]
    sides = {"A": _side(a, reference), "B": _side(b, reference)}
    rows = []
    for name in names:
        ca, cb = a.file.categories.get(name), b.file.categories.get(name)
        stale = [
            key for key, side in sides.items() if name in (side["edited_since_calibration"] or ())
        ]
        rows.append(
            {
                "category": name,
                "tau_a": ca.tau if ca else None,
                "tau_b": cb.tau if cb else None,
                "change": cb.tau - ca.tau if ca and cb else None,
                "expected_auto_pass_rate_a": ca.expected_auto_pass_rate if ca else None,
                "expected_auto_pass_rate_b": cb.expected_auto_pass_rate if cb else None,
                "only_in": "A" if cb is None else "B" if ca is None else None,
                "stale_auto_pass_in": stale,
            }
        )
    return {
        "a": sides["A"],
        "b": sides["B"],
        "same_content": a.digest == b.digest,
        "categories": rows,
    }


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _note(row: dict[str, Any]) -> str:
    """What the table's numbers do not say: a category in one file only, or at tau 0 (every
    post dispatched, nothing released: the calibration lacked positives, or a hand edit)."""
    notes = [f"only in {row['only_in']}"] if row["only_in"] else []
    zero = [side for side in ("a", "b") if row[f"tau_{side}"] == 0]
    if zero:
        which = " and ".join(side.upper() for side in zero)
        notes.append(f"WARNING tau 0 in {which}: every post dispatched, none released")
    if stale := row["stale_auto_pass_in"]:
        which = " and ".join(stale)
        notes.append(f"WARNING auto-pass {which} stale: tau edited after calibration")
    return "; ".join(notes)


def _overall(side: dict[str, Any]) -> str:
    """The calibrated overall auto-pass rate, and whether the file's taus are still the ones
    it was measured with."""
    text = _num(side["expected_overall_auto_pass_rate"], ".1%")
    edited = side["edited_since_calibration"]
    if text == "-":
        return text
    if edited is None:
        return f"{text} (unchecked: the file records no calibration.taus)"
    if edited:
        return f"{text} STALE: measured before the tau edits in {', '.join(edited)}"
    return text


def render_diff(d: dict[str, Any]) -> str:
    """The diff as a plain table (the `--json` form is `d` itself)."""
    lines = []
    for key in ("a", "b"):
        s = d[key]
        line = f"{key.upper()}: {s['path']}  version {s['version']}  model_version "
        line += f"{s['model_version']}  expected overall auto-pass {_overall(s)}"
        if s["refusal"]:
            line += f"\n   refused ({s['refusal']['reason']}): {s['refusal']['problem']}"
        lines.append(line)
    if d["a"]["model_version"] != d["b"]["model_version"]:
        lines.append("model_version differs: the two files are for different models")
    if d["same_content"]:
        lines.append("same content")
    header = ("category", "tau A", "tau B", "change", "auto-pass A", "auto-pass B", "")
    table = [header] + [
        (
            r["category"],
            _num(r["tau_a"], ".4f"),
            _num(r["tau_b"], ".4f"),
            "=" if r["change"] == 0 else _num(r["change"], "+.4f"),
            _num(r["expected_auto_pass_rate_a"], ".1%"),
            _num(r["expected_auto_pass_rate_b"], ".1%"),
            _note(r),
        )
        for r in d["categories"]
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def read_active(active_path: Path) -> tuple[Loaded | None, str | None]:
    """The active file, or None with why (None, None when there is no file at all)."""
    if not active_path.exists():
        return None, None
    try:
        return read_thresholds(active_path), None
    except ThresholdsError as exc:
        return None, f"the active file is refused ({exc.reason}): {exc.problem}"


def check_target(active_path: Path) -> None:
    """Refuse a target that cannot be replaced by a rename in its directory."""
    directory = active_path.parent
    if active_path.is_symlink():
        raise PromoteError(
            f"{active_path} is a symlink (a Kubernetes ConfigMap?): update what it points to"
        )
    if not directory.is_dir():
        raise PromoteError(f"{directory}: no such directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PromoteError(f"{directory}: not writable by this process")


def install(loaded: Loaded, active_path: Path) -> None:
    """Copy `loaded`'s exact bytes over `active_path`: temp file, fsync, rename."""

    try:
        text = loaded.raw.decode("utf-8")  # write_atomically writes UTF-8 text: byte-exact
    except UnicodeDecodeError:
        raise PromoteError(f"{loaded.path}: not UTF-8 text") from None
    try:
        write_atomically(active_path, text)
    except OSError as exc:
        raise PromoteError(f"{active_path}: cannot install: {exc.strerror or exc}") from None


def promote(
    path: Path, active_path: Path, model_dir: Path | None = None, *, dry_run: bool = False
) -> Promotion:
    """Check `path` and install it over `active_path`; `ThresholdsError`/`PromoteError` refuse."""
    active_path = Path(active_path)
    reference = model_reference(model_dir) if model_dir is not None else None
    new = read_thresholds(path)
    active, active_problem = read_active(active_path)
    warnings = (active_problem,) if active_problem else ()
    if reference is None and active is not None:
        reference = active_reference(active)
    elif reference is None:
        warnings += ("checked against the schema only: no --model and no valid active file",)
    check(new, reference)
    unchanged = active is not None and active.digest == new.digest
    if active is not None and active.file.version == new.file.version and not unchanged:
        raise PromoteError(
            f"version {new.file.version!r} is already active with other content: a version "
            f"must identify one content; give {path} a new version"
        )
    check_target(active_path)
    if not dry_run and not unchanged:
        install(new, active_path)
    return Promotion(
        active.file.version if active else None,
        new.file.version,
        diff(active, new) if active else None,
        unchanged,
        warnings=warnings,
    )
