"""Finite-sample recall guarantees for one category's threshold: the statistics, no I/O.

A threshold tau *misses* a positive iff its score p ≤ tau (the service dispatches iff p > tau),
so the recall on new positives is one minus their miss rate. On n calibration positives,
raising tau can only add misses; each rule below therefore reduces to "the most calibration
misses m* that tau may have" and tau is the highest annotated score with at most m* misses.
The rules differ in what they promise on *new* posts drawn like the calibration ones:

- `quantile` (the empirical rule, DESIGN.md's APR@R): calibration recall ≥ R, i.e.
  m* = ⌊n(1 − R)⌋. No finite-sample promise: tau sits as high as the sample allows, so the
  true miss rate is above 1 − R about half the time (with 25 positives, `hate`'s test recall
  fell under 0.90 in about half the splits). Kept because it *defines* the APR metric.
- `expected`: conformal risk control (Angelopoulos et al. 2022, "Conformal risk control",
  loss bounded by B = 1): the largest tau with (n/(n+1))·m̂(tau) + 1/(n+1) ≤ 1 − R, where
  m̂ is the calibration miss rate; then E[recall on a new positive] ≥ R over the draw of the
  calibration set. The average holds, a single calibration can still fall short.
- `confidence`: Learn-then-Test (Angelopoulos et al. 2021) with fixed-sequence testing. Each
  tau is a hypothesis H0(tau): "miss rate > 1 − R", with the exact binomial p-value
  P(Bin(n, 1 − R) ≤ misses(tau)) (the loss is binary, so this is valid and tighter than
  Hoeffding–Bentkus). Scanning tau from low to high (dispatch-everything first) and stopping
  at the first p-value > δ controls the family-wise error at δ without a multiplicity
  correction, so recall ≥ R with probability ≥ 1 − δ. Because the p-value only grows with the
  misses, the scan is the same as a one-sided Clopper–Pearson upper bound on the miss rate
  (`clopper_pearson_upper`) ≤ 1 − R. The default: "the recall target holds" should mean it
  holds on this calibration, not on average over calibrations nobody ran.

Too few positives: `expected` needs 1/(n+1) ≤ 1 − R (9 positives for R = 0.90), `confidence`
needs R^n ≤ δ, i.e. zero misses already significant (29 for R = 0.90, δ = 0.05); R = 1 is
never certifiable. Below that m* = −1 and the caller dispatches everything (tau = 0), which
misses no positive whatever the data: the safe side, never a threshold that only looks
calibrated.

Cross-checked in tests against MAPIE (`mapie.risk_control`): `BinaryClassificationController`
(risk "recall", `fwer_method="fixed_sequence"`) for the p-values and the accepted thresholds,
`get_r_hat_plus`/`find_best_predict_param` (method "crc") for `expected`.
"""

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy.stats import beta, binom

Guarantee = Literal["quantile", "expected", "confidence"]
GUARANTEES: tuple[Guarantee, ...] = get_args(Guarantee)
DEFAULT_GUARANTEE: Guarantee = "confidence"
DEFAULT_DELTA = 0.05
# 1 - 0.9 is 0.09999999999999998 in floating point, so 1/(9 + 1) ≤ 1 - 0.9 would be False:
# comparisons of exact fractions with 1 - R allow this much rounding.
_EPS = 1e-12


class GuaranteeError(ValueError):
    """An unusable guarantee setting (unknown rule, δ outside (0, 0.5), target outside (0, 1])."""


def check_guarantee(guarantee: str, delta: float, target: float | None = None) -> None:
    """Refuse an unknown rule, a δ that is no guarantee, or a target that is no recall."""
    if guarantee not in GUARANTEES:
        raise GuaranteeError(f"guarantee must be one of {', '.join(GUARANTEES)}, got {guarantee!r}")
    if guarantee == "confidence" and not 0.0 < delta < 0.5:
        # δ ≥ 0.5 would "guarantee" less than a coin flip; δ = 0 needs infinitely many positives.
        raise GuaranteeError(f"--delta must be in (0, 0.5), got {delta}")
    if target is not None and not 0.0 < target <= 1.0:
        raise GuaranteeError(f"recall target must be in (0, 1], got {target}")


def miss_p_value(misses: int, n: int, target: float) -> float:
    """LTT's p-value of H0 "miss rate > 1 − R" after `misses` of `n` positives: the exact
    binomial tail P(Bin(n, 1 − R) ≤ misses) (the largest under H0, at miss rate 1 − R)."""
    return float(binom.cdf(misses, n, 1.0 - target))


def clopper_pearson_upper(misses: int, n: int, delta: float) -> float:
    """One-sided (1 − δ) Clopper–Pearson upper bound on the miss rate: the p for which
    P(Bin(n, p) ≤ misses) = δ, i.e. the (1 − δ) quantile of Beta(misses + 1, n − misses)."""
    if misses >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, misses + 1, n - misses))


def crc_bound(misses: int, n: int) -> float:
    """CRC's bound on the expected miss rate of a new positive: (n/(n+1))·m̂ + 1/(n+1)."""
    return (misses + 1) / (n + 1)


def max_misses(guarantee: Guarantee, n: int, target: float, delta: float = DEFAULT_DELTA) -> int:
    """The most calibration misses tau may have among `n` positives; −1 when not even zero
    misses is enough (too few positives, or R = 1 under a guarantee)."""
    alpha = 1.0 - target
    if guarantee == "quantile":
        return math.floor(n * alpha + 1e-9) if n else -1
    if guarantee == "expected":
        # (m + 1)/(n + 1) ≤ 1 − R  ⟺  m ≤ (n + 1)(1 − R) − 1
        return min(n, math.floor((n + 1) * alpha + _EPS)) - 1 if alpha > 0 else -1
    if n == 0 or alpha <= 0:
        return -1
    tails = binom.cdf(np.arange(n + 1), n, alpha)  # non-decreasing in the misses
    return int(np.searchsorted(tails, delta, side="right")) - 1


def positives_needed(
    guarantee: Guarantee, target: float, delta: float = DEFAULT_DELTA, min_positives: int = 1
) -> int | None:
    """The fewest positives with which the rule can certify anything (m* ≥ 0); None when no
    number of positives will do (R = 1 under `expected` or `confidence`).

    `quantile` keeps its old floor: max(min_positives, ⌈1/(1 − R)⌉), below which a target R
    cannot be told from 100 % recall.
    """
    alpha = 1.0 - target
    if guarantee == "quantile":
        distinguishable = 1 if alpha <= 0 else math.ceil(1.0 / alpha - 1e-9)
        return max(min_positives, distinguishable)
    if alpha <= 0:
        return None
    if guarantee == "expected":
        return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))
    # R^n ≤ δ; start from the closed form, then settle it with the very test `max_misses` uses.
    n = max(1, math.ceil(math.log(delta) / math.log(target) - 1e-9))
    while max_misses(guarantee, n, target, delta) < 0:
        n += 1
    while n > 1 and max_misses(guarantee, n - 1, target, delta) >= 0:
        n -= 1
    return n


def miss_rate_bound(guarantee: Guarantee, misses: int, n: int, delta: float) -> float | None:
    """The statistic the rule compared with 1 − R at the chosen tau (None for `quantile`)."""
    if guarantee == "quantile":
        return None
    if guarantee == "expected":
        return crc_bound(misses, n)
    return clopper_pearson_upper(misses, n, delta)


def fixed_sequence_test(
    misses: np.ndarray, n: int, target: float, delta: float
) -> tuple[np.ndarray, int]:
    """LTT's fixed-sequence test along thresholds sorted from low to high.

    `misses[i]` is the calibration misses of the i-th threshold (non-decreasing). Returns the
    p-values and how many leading thresholds were accepted (the scan stops at the first
    p-value > δ); `max_misses` is the closed form of the same scan.
    """
    misses = np.asarray(misses)
    if misses.size and np.any(np.diff(misses) < 0):
        raise ValueError("fixed-sequence testing needs thresholds sorted from low to high")
    p_values = binom.cdf(misses, n, 1.0 - target)
    failed = np.flatnonzero(p_values > delta)
    return p_values, int(failed[0]) if failed.size else int(misses.size)


@dataclass(frozen=True)
class GuaranteedTau:
    """A rule's tau on one category: the misses it allows and those it has."""

    tau: float  # in [0, 1]; 0.0 dispatches everything
    allowed_misses: int  # m*; −1: too few positives, tau = 0.0
    misses: int  # calibration positives with p ≤ tau
    bound: float | None  # `miss_rate_bound` at tau; None when tau was forced to 0.0


def highest_tau(pos_scores: np.ndarray, scores: np.ndarray, allowed_misses: int) -> float:
    """The highest annotated score with at most `allowed_misses` positives at or below it,
    else 0.0 (dispatch everything). Ties never split: tau is an observed score, so `p > tau`
    dispatches exactly the samples counted."""
    if allowed_misses < 0 or scores.size == 0:
        return 0.0
    candidates = np.unique(scores)  # ascending
    misses = np.searchsorted(np.sort(pos_scores), candidates, side="right")
    ok = np.flatnonzero(misses <= allowed_misses)  # a prefix: misses grow with tau
    return max(float(candidates[ok[-1]]), 0.0) if ok.size else 0.0


def guaranteed_tau(
    pos_scores: np.ndarray,
    scores: np.ndarray,
    guarantee: Guarantee,
    target: float,
    delta: float = DEFAULT_DELTA,
) -> GuaranteedTau:
    """tau for one category under `guarantee`: `pos_scores` are its positives' scores,
    `scores` all its annotated samples' (positives included)."""
    pos_scores = np.asarray(pos_scores, dtype=np.float64)
    n = int(pos_scores.size)
    allowed = max_misses(guarantee, n, target, delta)
    tau = highest_tau(pos_scores, np.asarray(scores, dtype=np.float64), allowed)
    misses = int(np.sum(pos_scores <= tau))
    bound = miss_rate_bound(guarantee, misses, n, delta) if allowed >= 0 else None
    return GuaranteedTau(tau, allowed, misses, bound)


# What each rule does, in the words of the written file's `calibration.method`.
METHODS: dict[Guarantee, str] = {
    "quantile": "highest tau with recall >= recall_target on the annotated samples",
    "expected": "conformal risk control on each category's positives: highest tau with "
    "(n/(n+1)) * miss_rate + 1/(n+1) <= 1 - recall_target, so E[recall] >= recall_target",
    "confidence": "Learn-then-Test, fixed sequence from tau = 0 up: highest tau with "
    "P(Bin(n, 1 - recall_target) <= misses) <= delta (Clopper-Pearson upper bound on the "
    "miss rate <= 1 - recall_target), so recall >= recall_target with probability >= 1 - delta",
}


def describe(guarantee: Guarantee, target: float, delta: float) -> str:
    """How notes and tables name a rule and its target: `confidence recall 0.9 (δ = 0.05)`."""
    suffix = f" (δ = {delta:g})" if guarantee == "confidence" else ""
    return f"{guarantee} recall {target:g}{suffix}"


@dataclass(frozen=True)
class PlanRow:
    """`radar calibrate --plan`: the positives one category needs, and those the data has."""

    category: str
    recall_target: float
    positives_needed: int | None  # None: no number of positives will do
    n_positive: int | None = None  # None: no data given
    n_annotated: int | None = None

    @property
    def enough(self) -> bool | None:
        """Whether the data has the positives needed (None without data)."""
        if self.n_positive is None:
            return None
        return self.positives_needed is not None and self.n_positive >= self.positives_needed


def plan_rows(
    targets: dict[str, float],
    guarantee: Guarantee,
    delta: float = DEFAULT_DELTA,
    min_positives: int = 1,
    labels: np.ndarray | None = None,
) -> list[PlanRow]:
    """One `PlanRow` per category of `targets`; `labels` ([N, K], codes −1/0/1, columns in
    the order of `targets`) adds the counts."""
    rows = []
    for k, (name, target) in enumerate(targets.items()):
        needed = positives_needed(guarantee, target, delta, min_positives)
        if labels is None:
            rows.append(PlanRow(name, target, needed))
        else:
            column = labels[:, k]
            n_pos, n_ann = int(np.sum(column == 1)), int(np.sum(column != -1))
            rows.append(PlanRow(name, target, needed, n_pos, n_ann))
    return rows
