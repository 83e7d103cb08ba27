"""`radar calibrate`: per-category thresholds for a recall target, as the service's YAML file.

The service dispatches a post to category k iff p_k > tau_k; recall is counted on each
category's own annotated samples of the calibration data. Three rules pick tau
(`guarantee`, statistics in `app.evaluation.guarantees`, which says why each exists):

- `confidence` (the default): Learn-then-Test with fixed-sequence testing (equivalently a
  Clopper–Pearson bound on the miss rate): recall ≥ R on new posts with probability ≥ 1 − δ.
- `expected`: conformal risk control: E[recall on a new positive] ≥ R.
- `quantile`: the highest tau whose calibration recall is still ≥ R
  (`metrics.auto_pass_at_recall`, DESIGN.md's APR definition). It defines the APR metric but
  promises nothing: with few positives new-data recall falls under R about half the time
  (`tests/evaluation/test_guarantees.py` measures it), hence not the default.

Ties never split: tau is an observed score, so the calibration samples dispatched by
`p > tau` are exactly those counted.

Dispatching everything: when the rule needs every annotated sample dispatched, the file's
tau is 0.0, which dispatches every post because router scores are sigmoids, hence > 0. A
float32 sigmoid can underflow to exactly 0.0 (logit < about -104): a positive lost that way
is refused, never silently written.

Few positives, under a guarantee: a category with fewer positives than its guarantee needs
(29 for R = 0.90 at δ = 0.05 under `confidence`, 9 under `expected`) gets tau = 0.0 (dispatch
everything: the safe side), and a note in `calibration.notes` saying how many it needs —
never a refusal, never a threshold that only looks calibrated. `--plan` prints those counts
before anything is scored.

Few positives, under `quantile`: with P positives the recall moves in steps of 1/P, so a
target R can only be told apart from 100 % recall when P ≥ 1/(1 - R) (10 for 0.90, 20 for
0.95), and a tau picked from a handful of positives is noise. A category below
max(--min-positives, 1/(1 - R)) is refused unless `allow_few_positives`; a category with no
positive at all then gets tau = 0.0 and a note. `min_positives` and `allow_few_positives`
only apply to `quantile` (a guarantee sets its own minimum).

Some categories only: `only` with `base` recalibrates those categories and copies every other
entry from `base` (a thresholds file valid for the model), so that a data file labelled for
one category can update that one without touching the others.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from app.data.records import label_matrix, load_records
from app.evaluation.evaluate import ScoredData, default_command, now_iso, score_data
from app.evaluation.guarantees import (
    DEFAULT_DELTA,
    DEFAULT_GUARANTEE,
    METHODS,
    Guarantee,
    PlanRow,
    check_guarantee,
    describe,
    guaranteed_tau,
    plan_rows,
    positives_needed,
)
from app.evaluation.metrics import auto_pass_at_recall, overall_auto_pass_rate
from app.model.config import read_config
from app.thresholds import (
    ThresholdsFile,
    parse_thresholds,
    read_thresholds_file,
    validate_for_model,
    write_atomically,
)

DEFAULT_MIN_POSITIVES = 20
VERSION_MAX = 128  # ThresholdsFile.version's max_length
HEADER = (
    "# Written by `radar calibrate`: dispatch a post to a category iff p > tau.\n"
    "# How tau was chosen: calibration.method, and per category its guarantee and bound.\n"
    "# To deploy: rename this file over the active one (same filesystem, atomic).\n"
)


class CalibrationError(ValueError):
    """Calibration refused (too few positives, bad target, unknown category); says why."""


def parse_overrides(items: Sequence[str]) -> dict[str, float]:
    """`["fe=0.95", "rcs=0.8"]` → `{"fe": 0.95, "rcs": 0.8}`."""
    targets: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if not name.strip() or math.isnan(target):
            raise CalibrationError(f"--recall-per-category {item!r}: expected CATEGORY=RECALL")
        targets[name.strip()] = target
    return targets


def recall_targets(
    categories: Sequence[str], recall: float, per_category: Mapping[str, float] | None
) -> dict[str, float]:
    """The target of every category: `per_category` where given, else `recall`."""
    overrides = dict(per_category or {})
    unknown = sorted(set(overrides) - set(categories))
    if unknown:
        known = ", ".join(categories)
        raise CalibrationError(f"unknown categories {unknown} (the model's: {known})")
    targets = {name: float(overrides.get(name, recall)) for name in categories}
    for name, target in targets.items():
        if not 0.0 < target <= 1.0:
            raise CalibrationError(f"{name}: recall target must be in (0, 1], got {target}")
    return targets


def required_positives(target: float, min_positives: int) -> int:
    """Positives `quantile` needs for `target`: the floor, and enough to tell it from 100 %."""
    return positives_needed("quantile", target, min_positives=min_positives) or min_positives


@dataclass(frozen=True)
class CategoryCalibration:
    """One category's threshold and how it was obtained (NaN where there is no positive)."""

    category: str
    recall_target: float
    tau: float  # in [0, 1]; dispatch iff p > tau
    achieved_recall: float  # of `p > tau` on the annotated calibration samples
    expected_auto_pass_rate: float  # share of the annotated samples with p <= tau
    n_positive: int
    n_annotated: int
    note: str | None = None
    guarantee: Guarantee = "quantile"  # what a record built without a rule meant before
    delta: float | None = None  # `confidence` only
    # The rule's statistic at tau (Clopper–Pearson upper bound on the miss rate for
    # `confidence`, the CRC bound for `expected`): ≤ 1 − recall_target by construction.
    # None for `quantile` and where tau was forced to 0.0 (too few positives).
    miss_rate_bound: float | None = None
    positives_needed: int | None = None  # None: no number will do (R = 1 under a guarantee)

    def to_yaml(self) -> dict[str, Any]:
        """The file's entry: NaN is written as null (the schema wants [0, 1] or null)."""

        def num(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        entry: dict[str, Any] = {
            "tau": float(self.tau),
            "recall_target": self.recall_target,
            "achieved_recall": num(self.achieved_recall),
            "expected_auto_pass_rate": num(self.expected_auto_pass_rate),
            "n_positive": self.n_positive,
            "n_annotated": self.n_annotated,
            "guarantee": self.guarantee,
        }
        if self.delta is not None:
            entry["delta"] = self.delta
        entry["miss_rate_bound"] = self.miss_rate_bound
        entry["positives_needed"] = self.positives_needed
        return entry


def calibrate_category(
    name: str,
    y: np.ndarray,
    s: np.ndarray,
    target: float,
    note: str | None = None,
    *,
    guarantee: Guarantee = DEFAULT_GUARANTEE,
    delta: float = DEFAULT_DELTA,
    min_positives: int = DEFAULT_MIN_POSITIVES,
) -> CategoryCalibration:
    """This category's tau under `guarantee` (see the module doc), from its annotated samples.

    `min_positives` only feeds `quantile`'s recorded `positives_needed`.
    """
    check_guarantee(guarantee, delta, target)
    annotated = y != -1
    pos, s_ann = y[annotated] == 1, np.asarray(s, dtype=np.float64)[annotated]
    n_pos, bound = int(pos.sum()), None
    needed = positives_needed(guarantee, target, delta, min_positives)
    if guarantee == "quantile":
        chosen = auto_pass_at_recall(y, s, target)
        if math.isnan(chosen.tau):
            tau = 0.0  # nothing to calibrate on: dispatch everything, the safe side
            note = "; ".join(filter(None, [note, "no positive: tau 0.0 dispatches everything"]))
        else:
            tau = max(chosen.tau, 0.0)  # -inf (dispatch all) → 0.0: sigmoid scores are > 0
        lost = float(np.mean(s_ann[pos] > tau)) < target if n_pos else False
    else:
        picked = guaranteed_tau(s_ann[pos], s_ann, guarantee, target, delta)
        tau, bound = picked.tau, picked.bound
        if picked.allowed_misses < 0:
            rule = describe(guarantee, target, delta)
            why = (
                f"{rule} needs at least {needed} positives, the data has {n_pos}"
                if needed is not None
                else f"{rule} cannot be guaranteed from any number of positives"
            )
            note = "; ".join(filter(None, [note, f"{why}: tau 0.0 dispatches everything"]))
        lost = picked.misses > max(picked.allowed_misses, 0)
    achieved = float(np.mean(s_ann[pos] > tau)) if n_pos else math.nan
    if lost:  # only when a positive scored exactly 0.0 (see the module doc)
        raise CalibrationError(
            f"{name}: a positive scored exactly 0.0, so no tau in [0, 1] reaches recall "
            f"{target} (best {achieved:.4f})"
        )
    apr = float(np.mean(s_ann <= tau)) if s_ann.size else math.nan
    return CategoryCalibration(
        name,
        target,
        tau,
        achieved,
        apr,
        n_pos,
        int(s_ann.size),
        note,
        guarantee=guarantee,
        delta=delta if guarantee == "confidence" else None,
        miss_rate_bound=bound,
        positives_needed=needed,
    )


def short_of_positives(
    labels: np.ndarray, categories: Sequence[str], targets: Mapping[str, float], min_positives: int
) -> dict[str, str]:
    """{category: why} for every category with too few positives for its target."""
    short: dict[str, str] = {}
    for k, name in enumerate(categories):
        n_pos = int(np.sum(labels[:, k] == 1))
        need = required_positives(targets[name], min_positives)
        if n_pos < need:
            n_ann = int(np.sum(labels[:, k] != -1))
            short[name] = (
                f"{name}: {n_pos} positives of {n_ann} annotated, "
                f"recall {targets[name]} needs at least {need}"
            )
    return short


def refuse_few_positives(short: Mapping[str, str]) -> None:
    """Raise one `CalibrationError` naming every category in `short` (if any)."""
    if short:
        raise CalibrationError(
            "too few positives to calibrate: "
            + "; ".join(short.values())
            + ". Below 1/(1 - R) positives a recall of R cannot be told from 100 %, and a "
            "threshold from a handful of positives is noise. Label more, lower the target "
            "(--recall-per-category NAME=R), or pass --allow-few-positives."
        )


def calibrate_scores(
    labels: np.ndarray,
    scores: np.ndarray,
    categories: Sequence[str],
    targets: Mapping[str, float],
    *,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    allow_few_positives: bool = False,
    guarantee: Guarantee = DEFAULT_GUARANTEE,
    delta: float = DEFAULT_DELTA,
) -> list[CategoryCalibration]:
    """Calibrate every category (the columns of `labels`/`scores`, named by `categories`).

    Under `quantile`, too few positives are refused (all offenders named at once) unless
    `allow_few_positives`; under a guarantee they get tau = 0.0 and a note instead.
    """
    short: dict[str, str] = {}
    if guarantee == "quantile":
        short = short_of_positives(labels, categories, targets, min_positives)
        if not allow_few_positives:
            refuse_few_positives(short)
    return [
        calibrate_category(
            name,
            labels[:, k],
            scores[:, k],
            targets[name],
            f"allowed with few positives ({short[name]})" if name in short else None,
            guarantee=guarantee,
            delta=delta,
            min_positives=min_positives,
        )
        for k, name in enumerate(categories)
    ]


@dataclass(frozen=True)
class CalibrationResult:
    """What `calibrate_model` wrote."""

    path: Path
    version: str
    categories: list[CategoryCalibration]
    expected_overall_auto_pass_rate: float  # on the calibration data: dispatched nowhere
    document: dict[str, Any]
    guarantee: Guarantee = DEFAULT_GUARANTEE
    delta: float | None = None  # `confidence` only
    kept: tuple[str, ...] = ()  # categories copied from `base` (`only`)
    base: Path | None = None


@dataclass(frozen=True)
class BaseThresholds:
    """The thresholds file whose other categories `only` keeps (valid for the model)."""

    path: Path
    file: ThresholdsFile

    def entry(self, name: str) -> dict[str, Any]:
        """`name`'s entry as the file has it (absent fields stay absent)."""
        return self.file.categories[name].model_dump(exclude_none=True)

    def note(self, name: str) -> str | None:
        """`name`'s note in the base file's provenance, marked as kept from it."""
        notes = (self.file.calibration or {}).get("notes") or {}
        note = notes.get(name) if isinstance(notes, dict) else None
        return f"kept from {self.file.version}: {note}" if note else None


def load_base(path: Path | str, categories: Sequence[str], model_version: str) -> BaseThresholds:
    """Read `path` with the service's own checks: it must fit the model (`ThresholdsError`)."""
    path = Path(path)
    file = parse_thresholds(read_thresholds_file(path), str(path))
    validate_for_model(file, categories, model_version, str(path), "")
    return BaseThresholds(path, file)


def selected_categories(
    categories: Sequence[str], only: Sequence[str] | None, base: Path | str | None
) -> list[str]:
    """The categories to calibrate: all, or `only` (which needs a `base` to copy the rest)."""
    if not only:
        if base is not None:
            raise CalibrationError("--base is only read with --only CATEGORY ...")
        return list(categories)
    if base is None:
        raise CalibrationError("--only needs --base FILE: the thresholds to keep for the others")
    unknown = sorted(set(only) - set(categories))
    if unknown:
        known = ", ".join(categories)
        raise CalibrationError(f"--only: unknown categories {unknown} (the model's: {known})")
    return [name for name in categories if name in set(only)]  # the model's order


def targets_for(
    categories: Sequence[str],
    names: Sequence[str],
    recall: float,
    per_category: Mapping[str, float] | None,
) -> dict[str, float]:
    """`recall_targets` of the calibrated `names`; an override of a kept one is an error."""
    targets = recall_targets(categories, recall, per_category)
    stray = sorted(set(per_category or {}) - set(names))
    if stray:
        raise CalibrationError(f"--recall-per-category {stray}: not recalibrated (see --only)")
    return {name: targets[name] for name in names}


def default_version(model_version: str, date: str) -> str:
    """`<model_version>@<UTC date and time>`, within the schema's 128 characters."""
    stamp = date.replace("-", "").replace(":", "")  # 20250131T120000Z
    return f"{model_version[: VERSION_MAX - len(stamp) - 1]}@{stamp}"


def thresholds_document(
    scored: ScoredData,
    calibrated: Sequence[CategoryCalibration],
    *,
    version: str,
    date: str,
    command: str,
    min_positives: int,
    guarantee: Guarantee = DEFAULT_GUARANTEE,
    delta: float = DEFAULT_DELTA,
    base: BaseThresholds | None = None,
) -> dict[str, Any]:
    """The YAML document: the service's schema plus provenance under `calibration`.

    Every category of the model gets an entry, in the model's order: its calibration, or
    (with `base`) the base file's entry unchanged. The expected overall auto-pass rate is
    measured on `scored` with all of those taus.
    """
    fresh = {c.category: c for c in calibrated}
    kept = [name for name in scored.categories if name not in fresh]
    if kept and base is None:
        raise CalibrationError(f"no calibration and no base entry for {kept}")
    entries: dict[str, dict[str, Any]] = {}
    notes = {c.category: c.note for c in calibrated if c.note}
    for name in scored.categories:
        if name in fresh:
            entries[name] = fresh[name].to_yaml()
        elif base is not None:
            entries[name] = base.entry(name)
            if note := base.note(name):
                notes[name] = note
    taus = [entries[name]["tau"] for name in scored.categories]
    calibration: dict[str, Any] = {
        "method": METHODS[guarantee],
        "guarantee": guarantee,
        **({"delta": delta} if guarantee == "confidence" else {}),
        "data": str(scored.data),
        "data_fingerprint": scored.data_fingerprint,
        "n_posts": len(scored.post_ids),
        "date": date,
        "command": command,
        "recall_targets": {c.category: c.recall_target for c in calibrated},
        "expected_overall_auto_pass_rate": overall_auto_pass_rate(scored.scores, taus),
        # The taus those rates were measured with: `radar thresholds diff` and the service's
        # provenance gauges tell a later hand edit by them (`edited_since_calibration`).
        "taus": dict(zip(scored.categories, taus, strict=True)),
    }
    if guarantee == "quantile":
        calibration["min_positives"] = min_positives
    if base is not None:
        calibration["recalibrated"] = list(fresh)
        calibration["kept_from"] = {
            "path": str(base.path),
            "version": base.file.version,
            "categories": kept,
        }
    if notes:
        calibration["notes"] = notes
    return {
        "version": version,
        "model_version": scored.model_version,
        "categories": entries,
        "calibration": calibration,
    }


def _check_settings(min_positives: int, guarantee: Guarantee, delta: float) -> None:
    if min_positives < 1:
        raise CalibrationError(f"--min-positives must be ≥ 1, got {min_positives}")
    check_guarantee(guarantee, delta)


def calibrate_scored(
    scored: ScoredData,
    out: Path | str,
    *,
    recall: float,
    per_category: Mapping[str, float] | None = None,
    version: str | None = None,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    allow_few_positives: bool = False,
    command: str | None = None,
    guarantee: Guarantee = DEFAULT_GUARANTEE,
    delta: float = DEFAULT_DELTA,
    only: Sequence[str] | None = None,
    base: Path | str | None = None,
) -> CalibrationResult:
    """Calibrate already-scored data and write the thresholds file `out` atomically.

    `guarantee` and `delta` choose the rule (module doc); `min_positives` and
    `allow_few_positives` apply to `quantile` only. With `only`, just those categories are
    calibrated and the others' entries are copied from `base`, which must be valid for the
    model. The document is validated with the service's own checks (schema, categories,
    model_version) before anything is written, so a written file always loads.
    """
    _check_settings(min_positives, guarantee, delta)
    out, date = Path(out), now_iso()
    names = selected_categories(scored.categories, only, base)
    kept_from = None if base is None else load_base(base, scored.categories, scored.model_version)
    targets = targets_for(scored.categories, names, recall, per_category)
    columns = [scored.categories.index(name) for name in names]
    calibrated = calibrate_scores(
        scored.labels[:, columns],
        scored.scores[:, columns],
        names,
        targets,
        min_positives=min_positives,
        allow_few_positives=allow_few_positives,
        guarantee=guarantee,
        delta=delta,
    )
    version = version or default_version(scored.model_version, date)
    document = thresholds_document(
        scored,
        calibrated,
        version=version,
        date=date,
        command=command if command is not None else default_command(),
        min_positives=min_positives,
        guarantee=guarantee,
        delta=delta,
        base=kept_from,
    )
    parsed = ThresholdsFile.model_validate(document)
    validate_for_model(parsed, scored.categories, scored.model_version, str(out), "")
    text = HEADER + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    write_atomically(out, text)
    overall = document["calibration"]["expected_overall_auto_pass_rate"]
    kept = tuple(name for name in scored.categories if name not in names)
    return CalibrationResult(
        out,
        version,
        calibrated,
        overall,
        document,
        guarantee=guarantee,
        delta=delta if guarantee == "confidence" else None,
        kept=kept,
        base=kept_from.path if kept_from else None,
    )


def calibrate_model(
    model_dir: Path | str,
    data: Path | str,
    out: Path | str,
    *,
    recall: float,
    per_category: Mapping[str, float] | None = None,
    version: str | None = None,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    allow_few_positives: bool = False,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
    command: str | None = None,
    guarantee: Guarantee = DEFAULT_GUARANTEE,
    delta: float = DEFAULT_DELTA,
    only: Sequence[str] | None = None,
    base: Path | str | None = None,
    feature_cache: Path | str | None = None,
) -> CalibrationResult:
    """Score `data` with the router in `model_dir`, calibrate, write `out` (see above)."""
    # Check settings, targets, the base file and positives before the (slow) scoring pass.
    _check_settings(min_positives, guarantee, delta)
    config = read_config(Path(model_dir))
    categories = config.categories
    names = selected_categories(categories, only, base)
    if base is not None:  # fails now rather than after scoring
        load_base(base, categories, config.model_version)
    targets = targets_for(categories, names, recall, per_category)
    if guarantee == "quantile" and not allow_few_positives:
        labels = label_matrix(load_records(data, names, allow_other_categories=True), names)
        refuse_few_positives(short_of_positives(labels, names, targets, min_positives))
    scored = score_data(
        model_dir,
        data,
        batch_size=batch_size,
        device=device,
        progress=progress,
        feature_cache=feature_cache,
    )
    return calibrate_scored(
        scored,
        out,
        recall=recall,
        per_category=per_category,
        version=version,
        min_positives=min_positives,
        allow_few_positives=allow_few_positives,
        command=command,
        guarantee=guarantee,
        delta=delta,
        only=only,
        base=base,
    )


def plan_positives(
    model_dir: Path | str,
    data: Path | str | None = None,
    *,
    recall: float,
    per_category: Mapping[str, float] | None = None,
    guarantee: Guarantee = DEFAULT_GUARANTEE,
    delta: float = DEFAULT_DELTA,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    only: Sequence[str] | None = None,
) -> list[PlanRow]:
    """Per category of the model (or of `only`), the positives `guarantee` needs for its
    target; with `data`, also how many it has, counted from the labels without scoring."""
    _check_settings(min_positives, guarantee, delta)
    categories = read_config(Path(model_dir)).categories
    unknown = sorted(set(only or ()) - set(categories))
    if unknown:
        raise CalibrationError(f"--only: unknown categories {unknown} (the model's: {categories})")
    names = [name for name in categories if not only or name in set(only)]
    targets = targets_for(categories, names, recall, per_category)
    labels = None
    if data is not None:
        labels = label_matrix(load_records(data, names, allow_other_categories=True), names)
    return plan_rows(targets, guarantee, delta, min_positives, labels)
