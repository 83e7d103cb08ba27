"""The thresholds file: YAML schema, validation against the loaded model, hot reload.

Ops edit or replace the active file; the service polls it and swaps the thresholds in
atomically. A file that fails any check never replaces the active one: the refusal is
returned (and logged and counted by the caller) and the old thresholds stay.
"""

import datetime
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

# Bounded label values for the reload-failure metric.
RefusalReason = Literal[
    "unreadable", "too_large", "yaml", "schema", "categories", "model_version", "version_reused"
]

# A thresholds file is a few KB; one of 20 MB took 30 s to parse and slowed `/route` to a p50
# of 1 s while it did. Larger files are refused before they are parsed.
MAX_THRESHOLDS_BYTES = 1 << 20

# libyaml's parser where PyYAML was built with it (the wheels are), else the pure-Python one.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """yaml's safe loader, refusing a mapping that repeats a key.

    PyYAML keeps the last of repeated keys, so a second `smear:` entry would silently
    replace the first one's tau.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} repeated in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class ThresholdsError(Exception):
    """A thresholds file was refused; `reason` is one of `RefusalReason`.

    `str()` names the file (for the log); `problem` does not, so HTTP answers (readiness,
    the admin reload) can say what is wrong without disclosing server paths.
    """

    def __init__(self, reason: RefusalReason, source: str, problem: str) -> None:
        self.reason = reason
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class CategoryThreshold(BaseModel):
    """`tau` decides (dispatch iff p > tau); the rest records how it was calibrated.

    Strict types: YAML reads `tau: on` as true, which lax validation would take as 1.0 (that
    category never dispatched), and `"0.9"` would be coerced; both are refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    tau: float = Field(ge=0.0, le=1.0)
    recall_target: float | None = Field(default=None, ge=0.0, le=1.0)
    achieved_recall: float | None = Field(default=None, ge=0.0, le=1.0)
    expected_auto_pass_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    n_positive: int | None = Field(default=None, ge=0)
    n_annotated: int | None = Field(default=None, ge=0)
    # `radar calibrate --guarantee` (app/evaluation/guarantees.py): the rule, its δ, the bound
    # it reached at tau and the positives it needs; absent in hand-written files.
    guarantee: Literal["quantile", "expected", "confidence"] | None = None
    delta: float | None = Field(default=None, gt=0.0, lt=1.0)
    miss_rate_bound: float | None = Field(default=None, ge=0.0, le=1.0)
    positives_needed: int | None = Field(default=None, ge=0)


class AuditBoostEntry(BaseModel):
    """`audit_boost: {hate: {rate: 0.1, until: 2026-12-02T12:00:00Z}}`: while this file is
    active and until that time, the category's released posts are audited at `rate` instead
    of the service's own rate (the higher of the two), so that estimates of the new
    thresholds' recall gather verdicts quickly after a promotion.

    `until` is an absolute time with its zone, not a duration: a duration counted from
    when a replica loads the file would start again at every restart, days later too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    rate: float = Field(gt=0.0, le=1.0)
    # Not strict: YAML gives a datetime for an unquoted time, a string for a quoted one.
    until: AwareDatetime = Field(strict=False)

    @field_validator("until", mode="before")
    @classmethod
    def _a_time(cls, value: object) -> object:
        # Lax datetime parsing would take a number as Unix seconds: only a time is a time.
        if not isinstance(value, str | datetime.datetime):
            raise ValueError("expected an ISO-8601 time with its zone, e.g. 2026-12-02T12:00:00Z")
        return value


class ThresholdsFile(BaseModel):
    """The whole YAML document."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: str = Field(min_length=1, max_length=128)
    model_version: str = Field(min_length=1, max_length=128)
    categories: dict[str, CategoryThreshold]
    calibration: dict[str, Any] | None = Field(
        default=None, description="provenance: data fingerprint, date, command, ..."
    )
    audit_boost: dict[str, AuditBoostEntry] = Field(default_factory=dict)


@dataclass(frozen=True)
class AuditBoost:
    """A raised audit rate for one category until `until` (Unix seconds)."""

    rate: float
    until: float


@dataclass(frozen=True)
class ActiveThresholds:
    """One validated thresholds version; immutable, so a batch can hold on to it."""

    version: str
    model_version: str
    taus: dict[str, float]
    digest: str
    # Provenance the alerts compare live traffic with (`radar calibrate` writes it; None
    # where a hand-written file has none): per category recall target and calibrated pass
    # rate, and the calibrated overall auto-pass rate.
    recall_targets: dict[str, float | None] = field(default_factory=dict)
    expected_pass_rates: dict[str, float | None] = field(default_factory=dict)
    expected_overall_auto_pass_rate: float | None = None
    # Per category: a raised audit rate while this version is active (`AuditBoostEntry`).
    audit_boost: dict[str, AuditBoost] = field(default_factory=dict)

    def dispatch(self, scores: dict[str, float]) -> list[str]:
        """Categories whose score exceeds their threshold, in category order."""
        return [name for name, tau in self.taus.items() if scores[name] > tau]


def parse_thresholds(text: bytes, source: str = "<thresholds>") -> ThresholdsFile:
    """Parse YAML bytes into a `ThresholdsFile`; every failure is a `ThresholdsError`."""
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise ThresholdsError("yaml", source, f"not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ThresholdsError("schema", source, "expected a mapping at the top level")
    try:
        return ThresholdsFile.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ThresholdsError("schema", source, problems) from None


def validate_for_model(
    file: ThresholdsFile, categories: Sequence[str], model_version: str, source: str, digest: str
) -> ActiveThresholds:
    """Check the file fits the loaded model: same categories, same `model_version`."""
    missing = [c for c in categories if c not in file.categories]
    unknown = [c for c in file.categories if c not in categories]
    if missing or unknown:
        raise ThresholdsError(
            "categories",
            source,
            f"categories do not match the model: missing {missing}, unknown {unknown}",
        )
    not_boostable = [c for c in file.audit_boost if c not in categories]
    if not_boostable:
        raise ThresholdsError(
            "categories",
            source,
            f"audit_boost names categories the model does not have: {not_boostable}",
        )
    if file.model_version != model_version:
        raise ThresholdsError(
            "model_version",
            source,
            f"calibrated for model {file.model_version!r}, "
            f"but the loaded model is {model_version!r}",
        )
    taus = {name: file.categories[name].tau for name in categories}
    # A rate measured with other taus than the file's would move the alerts' band to a
    # place the traffic never was: an edited category's rate, and then the overall, is None.
    edited = set(edited_since_calibration(file) or ())
    overall = (file.calibration or {}).get("expected_overall_auto_pass_rate")
    return ActiveThresholds(
        file.version,
        file.model_version,
        taus,
        digest,
        recall_targets={name: file.categories[name].recall_target for name in categories},
        expected_pass_rates={
            name: None if name in edited else file.categories[name].expected_auto_pass_rate
            for name in categories
        },
        expected_overall_auto_pass_rate=None if edited else provenance_rate(overall),
        audit_boost={
            name: AuditBoost(entry.rate, entry.until.timestamp())
            for name, entry in file.audit_boost.items()
        },
    )


def provenance_rate(value: Any) -> float | None:
    """A rate from the free-form `calibration` block, if it is a number (YAML booleans are
    not)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def edited_since_calibration(file: ThresholdsFile) -> list[str] | None:
    """Categories whose tau differs from the one the calibrated rates were measured with.

    `radar calibrate` records those taus as `calibration.taus`; a hand edit of a tau leaves
    the recorded rates (the category's and the overall auto-pass) describing other
    thresholds. None when the file records no taus (hand-written, or calibrated before the
    record existed): nothing to check against.
    """
    recorded = (file.calibration or {}).get("taus")
    if not isinstance(recorded, dict):
        return None
    return [
        name
        for name, entry in file.categories.items()
        if provenance_rate(recorded.get(name)) != entry.tau
    ]


def read_thresholds_file(path: Path) -> bytes:
    """The file's bytes; any failure is a `ThresholdsError` with reason `unreadable`."""
    try:
        with Path(path).open("rb") as handle:
            raw = handle.read(MAX_THRESHOLDS_BYTES + 1)
    except PermissionError:
        # Not "missing": a file (or directory) with the wrong owner or mode says so.
        problem = "permission denied: this process may not read the file"
        raise ThresholdsError("unreadable", str(path), problem) from None
    except FileNotFoundError:
        raise ThresholdsError("unreadable", str(path), "no such file") from None
    except OSError as exc:
        raise ThresholdsError("unreadable", str(path), f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_THRESHOLDS_BYTES:
        problem = f"larger than {MAX_THRESHOLDS_BYTES} bytes: not a thresholds file"
        raise ThresholdsError("too_large", str(path), problem)
    return raw


def load_thresholds(path: Path, categories: Sequence[str], model_version: str) -> ActiveThresholds:
    """Read, parse and validate one thresholds file."""
    raw = read_thresholds_file(path)
    digest = hashlib.sha256(raw).hexdigest()
    return validate_for_model(
        parse_thresholds(raw, str(path)), categories, model_version, str(path), digest
    )


@dataclass(frozen=True)
class ReloadResult:
    """What a reload attempt did: `changed`, `unchanged`, or `refused` with the reason.

    `message` says what is wrong with a refused file, without its path (it is shown to
    HTTP callers); the log line has the path.
    """

    status: Literal["changed", "unchanged", "refused"]
    active: ActiveThresholds | None
    reason: RefusalReason | None = None
    message: str = ""


class ThresholdsStore:
    """Holds the active thresholds for one model and reloads them from `path` on demand.

    Readers take `store.active` (one reference read, so a batch sees one version); reloads
    are serialised by a lock and swap the reference only after every check has passed.
    """

    def __init__(
        self,
        path: Path,
        categories: Sequence[str],
        model_version: str,
        *,
        role: str = "active",
    ) -> None:
        # `role` names the file in log lines: "active" decides, "shadow" only watches, and
        # an operator reading the log must tell them apart.
        self.role = role
        self.path = Path(path)
        self.categories = tuple(categories)
        self.model_version = model_version
        self.active: ActiveThresholds | None = None
        self.last_error: ThresholdsError | None = None
        self._lock = threading.Lock()
        self._last_stat: tuple[int, int, int, int] | None = None
        self._pending_stat: tuple[int, int, int, int] | None = None  # changed, not yet stable

    def reload(self) -> ReloadResult:
        """Load the file now; keep the active thresholds if it is refused."""
        with self._lock:
            self._last_stat = self._stat()
            try:
                fresh = load_thresholds(self.path, self.categories, self.model_version)
            except ThresholdsError as exc:
                self.last_error = exc
                self._log_refusal(exc, self.active.version if self.active else "none")
                return ReloadResult("refused", self.active, exc.reason, exc.problem)
            if self.active is not None and fresh.digest == self.active.digest:
                self.last_error = None
                return ReloadResult("unchanged", self.active)
            if self.active is not None and fresh.version == self.active.version:
                # The version is what decisions, metrics and audits are labelled with: new
                # content under an old version would make two sets of taus one version.
                exc = ThresholdsError(
                    "version_reused",
                    str(self.path),
                    f"content changed but version is still {fresh.version!r}: give the new "
                    "thresholds a new version",
                )
                self.last_error = exc
                self._log_refusal(exc, fresh.version)
                return ReloadResult("refused", self.active, exc.reason, exc.problem)
            self.last_error = None
            log.info(
                "%s thresholds version %s loaded (model %s)",
                self.role,
                fresh.version,
                fresh.model_version,
            )
            self.active = fresh
            return ReloadResult("changed", fresh)

    def _log_refusal(self, exc: ThresholdsError, keeping: str) -> None:
        """An active file refused is an error (it decides); a shadow file refused, or absent
        before any was loaded, is a warning: the shadow only watches."""
        level = logging.ERROR if self.role == "active" else logging.WARNING
        log.log(
            level, "%s thresholds refused (%s); keeping %s: %s", self.role, exc.reason, keeping, exc
        )

    def reload_if_modified(self) -> ReloadResult | None:
        """Poll step: reload once the file has changed since the last try (see `_stat`) and
        then stayed the same for one more poll.

        A file written in place in several steps is seen between them by a poll that falls
        there (`smear` went live at 0.8, then 0.8656, under one version): waiting for two
        polls that agree applies it only once the writer has stopped. Atomic replaces
        (`write_atomically`, `radar thresholds promote`) are whole at once; they wait one
        poll too. `reload()` (start-up, the admin endpoint) reads the file at once.
        """
        stat = self._stat()
        if stat == self._last_stat:
            self._pending_stat = None
            return None
        if stat != self._pending_stat:
            self._pending_stat = stat  # changed: look again at the next poll
            return None
        self._pending_stat = None
        return self.reload()

    def _stat(self) -> tuple[int, int, int, int] | None:
        """What identifies one version of the file: mtime and size for an edit in place, and
        the inode (with its device) for an atomic replace (write a temp file, rename it over
        the path; a Kubernetes ConfigMap update swaps a symlink, which `stat` follows), which
        may keep the mtime and the size the same."""
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, rename it over `path`.

    The service polls the file: it must only ever see the old or the whole new file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        tmp.chmod(0o644)  # mkstemp makes it 0600: the service may run as another user
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
