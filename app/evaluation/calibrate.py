"""`radar calibrate`: per-category thresholds for a recall target, as the service's YAML file.

For each category, on its own annotated samples of the calibration data, tau is the highest
threshold whose recall is still ≥ the target (`metrics.auto_pass_at_recall`, DESIGN.md's APR
definition); the service then dispatches iff p > tau. Ties never split: tau is an observed
score, so the calibration samples dispatched by `p > tau` are exactly those the recall counts.

Dispatching everything: when the target needs every annotated sample dispatched,
`auto_pass_at_recall` gives tau = -inf, but the file's tau must lie in [0, 1]. It is written as
0.0, which dispatches the same samples because router scores are sigmoids, hence > 0. A float32
sigmoid can underflow to exactly 0.0 (logit < about -104): the achieved recall is recomputed
with the written tau and a positive lost that way is refused, never silently written.

Few positives: with P positives the recall moves in steps of 1/P, so a target R can only be
told apart from 100 % recall when P ≥ 1/(1 - R) (10 for 0.90, 20 for 0.95), and a tau picked
from a handful of positives is noise. A category below max(--min-positives, 1/(1 - R)) is
refused unless `allow_few_positives`; a category with no positive at all then gets tau = 0.0
(dispatch everything: the safe side) and a note in `calibration.notes`.
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
from app.evaluation.metrics import auto_pass_at_recall, overall_auto_pass_rate
from app.model.config import read_config
from app.thresholds import ThresholdsFile, validate_for_model, write_atomically

DEFAULT_MIN_POSITIVES = 20
VERSION_MAX = 128  # ThresholdsFile.version's max_length
HEADER = (
    "# Written by `radar calibrate`: dispatch a post to a category iff p > tau.\n"
    "# tau = the highest threshold keeping recall >= recall_target on the calibration data.\n"
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
    """Positives needed for `target`: the floor, and enough to tell it from 100 % recall."""
    distinguishable = 1 if target >= 1.0 else math.ceil(1.0 / (1.0 - target) - 1e-9)
    return max(min_positives, distinguishable)


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

    def to_yaml(self) -> dict[str, Any]:
        """The file's entry: NaN is written as null (the schema wants [0, 1] or null)."""

        def num(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        return {
            "tau": float(self.tau),
            "recall_target": self.recall_target,
            "achieved_recall": num(self.achieved_recall),
            "expected_auto_pass_rate": num(self.expected_auto_pass_rate),
            "n_positive": self.n_positive,
            "n_annotated": self.n_annotated,
        }


def calibrate_category(
    name: str, y: np.ndarray, s: np.ndarray, target: float, note: str | None = None
) -> CategoryCalibration:
    """The highest tau in [0, 1] whose recall on this category's annotated samples ≥ target."""
    annotated = y != -1
    pos, s_ann = y[annotated] == 1, np.asarray(s, dtype=np.float64)[annotated]
    chosen = auto_pass_at_recall(y, s, target)
    if math.isnan(chosen.tau):
        tau = 0.0  # nothing to calibrate on: dispatch everything, the safe side
        note = "; ".join(filter(None, [note, "no positive: tau 0.0 dispatches everything"]))
    else:
        tau = max(chosen.tau, 0.0)  # -inf (dispatch all) → 0.0: sigmoid scores are > 0
    achieved = float(np.mean(s_ann[pos] > tau)) if pos.any() else math.nan
    if achieved < target:  # only when a positive scored exactly 0.0 (see the module doc)
        raise CalibrationError(
            f"{name}: a positive scored exactly 0.0, so no tau in [0, 1] reaches recall "
            f"{target} (best {achieved:.4f})"
        )
    apr = float(np.mean(s_ann <= tau)) if s_ann.size else math.nan
    return CategoryCalibration(
        name, target, tau, achieved, apr, int(pos.sum()), int(s_ann.size), note
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
) -> list[CategoryCalibration]:
    """Calibrate every category; refuse (all offenders named at once) too few positives."""
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
) -> dict[str, Any]:
    """The YAML document: the service's schema plus provenance under `calibration`."""
    taus = [c.tau for c in calibrated]
    notes = {c.category: c.note for c in calibrated if c.note}
    calibration: dict[str, Any] = {
        "method": "highest tau with recall >= recall_target on the annotated samples",
        "data": str(scored.data),
        "data_fingerprint": scored.data_fingerprint,
        "n_posts": len(scored.post_ids),
        "date": date,
        "command": command,
        "recall_targets": {c.category: c.recall_target for c in calibrated},
        "min_positives": min_positives,
        "expected_overall_auto_pass_rate": overall_auto_pass_rate(scored.scores, taus),
    }
    if notes:
        calibration["notes"] = notes
    return {
        "version": version,
        "model_version": scored.model_version,
        "categories": {c.category: c.to_yaml() for c in calibrated},
        "calibration": calibration,
    }


def _check_min_positives(min_positives: int) -> None:
    if min_positives < 1:
        raise CalibrationError(f"--min-positives must be ≥ 1, got {min_positives}")


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
) -> CalibrationResult:
    """Calibrate already-scored data and write the thresholds file `out` atomically.

    The document is validated with the service's own checks (schema, categories,
    model_version) before anything is written, so a written file always loads.
    """
    _check_min_positives(min_positives)
    out, date = Path(out), now_iso()
    targets = recall_targets(scored.categories, recall, per_category)
    calibrated = calibrate_scores(
        scored.labels,
        scored.scores,
        scored.categories,
        targets,
        min_positives=min_positives,
        allow_few_positives=allow_few_positives,
    )
    version = version or default_version(scored.model_version, date)
    document = thresholds_document(
        scored,
        calibrated,
        version=version,
        date=date,
        command=command if command is not None else default_command(),
        min_positives=min_positives,
    )
    parsed = ThresholdsFile.model_validate(document)
    validate_for_model(parsed, scored.categories, scored.model_version, str(out), "")
    text = HEADER + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    write_atomically(out, text)
    overall = document["calibration"]["expected_overall_auto_pass_rate"]
    return CalibrationResult(out, version, calibrated, overall, document)


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
) -> CalibrationResult:
    """Score `data` with the router in `model_dir`, calibrate, write `out` (see above)."""
    # Check targets and positives before the (slow) scoring pass: fail in a second.
    _check_min_positives(min_positives)
    categories = read_config(Path(model_dir)).categories
    targets = recall_targets(categories, recall, per_category)
    if not allow_few_positives:
        labels = label_matrix(
            load_records(data, categories, allow_other_categories=True), categories
        )
        refuse_few_positives(short_of_positives(labels, categories, targets, min_positives))
    scored = score_data(model_dir, data, batch_size=batch_size, device=device, progress=progress)
    return calibrate_scored(
        scored,
        out,
        recall=recall,
        per_category=per_category,
        version=version,
        min_positives=min_positives,
        allow_few_positives=allow_few_positives,
        command=command,
    )
