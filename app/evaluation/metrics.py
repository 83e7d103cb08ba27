"""Per-category metrics of DESIGN.md ("Metrics"), in plain numpy.

Every metric of one category is computed on that category's own annotated samples: label
codes are DESIGN.md's (-1 = not annotated, excluded; 0 = negative; 1 = positive).

Undefined metrics: a category with no annotated sample or no positive has no recall, so its
PR-AUC, R@P and APR are *undefined*. The functions then return NaN (never a crash, never a
silent 0), and `CategoryMetrics.defined` / `undefined_reason` say so explicitly; averages
skip such categories and `EvaluationReport.to_dict()` writes NaN as None (valid JSON).

Threshold conventions:
- The service dispatches a post to category k iff `p_k > tau_k`; auto-pass is `p_k <= tau_k`.
  `auto_pass_at_recall` returns a `tau` for exactly that rule, and it never splits tied
  scores: tau is always an observed score (the highest score left auto-passed) or -inf
  (every calibration sample must be dispatched). So the calibration samples dispatched by
  `p > tau` are exactly those the recall was computed on, and `p <= tau` is the APR.
- `recall_at_precision` follows torchmetrics: its `threshold` predicts positive iff
  `s >= threshold`. It is a reporting operating point, not a service tau.
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

MIN_PRECISION = 0.60
RECALL_TARGETS = (0.90, 0.95)


class RecallAtPrecision(NamedTuple):
    """Highest recall at precision ≥ min_precision; threshold in the `s >= threshold` sense."""

    recall: float  # 0.0 when no threshold reaches the precision; NaN when undefined
    threshold: float  # NaN when recall is 0 or undefined (torchmetrics does the same)


class AutoPass(NamedTuple):
    """Auto-pass rate at a recall target, with the service threshold that realises it."""

    apr: float  # share of the annotated samples with p <= tau
    tau: float  # dispatch iff p > tau; -inf means dispatch everything
    achieved_recall: float  # recall of `p > tau` on these samples (≥ the target)


class RecallCI(NamedTuple):
    """Bootstrap percentile interval of the recall realised at a threshold."""

    recall: float
    low: float
    high: float


def _annotated(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate one category's labels/scores and keep its annotated samples (y != -1)."""
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of one length, got {y.shape}, {s.shape}")
    if not np.isin(y, (-1, 0, 1)).all():
        raise ValueError("labels must be -1 (not annotated), 0 or 1")
    keep = y != -1
    s = s[keep]
    if not np.isfinite(s).all():
        raise ValueError("scores of annotated samples must be finite")
    return y[keep] == 1, s


def _curve(pos: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores descending and the TP/FP counts of `s >= score` at each.

    Tied scores form one threshold: counts are taken only at the last sample of a tie group,
    which is what makes the step-wise AP match scikit-learn.
    """
    order = np.argsort(-s, kind="stable")
    s_sorted, pos_sorted = s[order], pos[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(pos_sorted)[last_of_group].astype(np.float64)
    fps = (last_of_group + 1) - tps
    return s_sorted[last_of_group], tps, fps


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """PR-AUC as scikit-learn's `average_precision_score`: Σ_n (R_n − R_{n−1}) · P_n.

    Step-wise, not a trapezoid (the trapezoid is optimistic). NaN when undefined.
    """
    pos, s = _annotated(y, s)
    if not pos.any():
        return math.nan
    _, tps, fps = _curve(pos, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def recall_at_precision(
    y: np.ndarray, s: np.ndarray, min_precision: float = MIN_PRECISION
) -> RecallAtPrecision:
    """Highest recall with precision ≥ min_precision (torchmetrics BinaryRecallAtFixedPrecision).

    Among the thresholds with that recall the highest precision (i.e. highest threshold)
    wins; the (P=1, R=0) end point of the curve is not a candidate, so an unreachable
    precision gives recall 0.0 and threshold NaN. NaN recall when undefined.
    """
    if not 0.0 <= min_precision <= 1.0:
        raise ValueError(f"min_precision must be in [0, 1], got {min_precision}")
    pos, s = _annotated(y, s)
    if not pos.any():
        return RecallAtPrecision(math.nan, math.nan)
    thresholds, tps, fps = _curve(pos, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    ok = np.flatnonzero(precision >= min_precision)
    if ok.size == 0:
        return RecallAtPrecision(0.0, math.nan)
    # Recall is non-decreasing as the threshold falls, so the first index with the maximal
    # recall among qualifying points has the highest threshold and precision.
    best = ok[np.argmax(recall[ok])]
    if recall[best] == 0.0:
        return RecallAtPrecision(0.0, math.nan)
    return RecallAtPrecision(float(recall[best]), float(thresholds[best]))


def auto_pass_at_recall(y: np.ndarray, s: np.ndarray, recall: float) -> AutoPass:
    """APR@R: take the highest threshold whose recall is still ≥ `recall`; APR = P(p ≤ tau).

    Candidates are the partitions "dispatch every sample scoring ≥ u" over the distinct
    scores u, so tied scores always land on the same side. For the chosen partition,
    tau = the highest score that is *not* dispatched (or -inf if all are), hence
    `p > tau` dispatches exactly that partition. Used as-is for threshold calibration.
    NaN triple when undefined.
    """
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall target must be in (0, 1], got {recall}")
    pos, s = _annotated(y, s)
    if not pos.any():
        return AutoPass(math.nan, math.nan, math.nan)
    thresholds, tps, fps = _curve(pos, s)
    recalls = tps / tps[-1]
    # The last group dispatches everything (recall 1), so some index always qualifies; the
    # first one dispatches the fewest samples.
    j = int(np.argmax(recalls >= recall))
    tau = float(thresholds[j + 1]) if j + 1 < thresholds.size else -math.inf
    apr = (s.size - (tps[j] + fps[j])) / s.size
    return AutoPass(float(apr), tau, float(recalls[j]))


def bootstrap_recall_ci(
    y: np.ndarray,
    s: np.ndarray,
    tau: float,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> RecallCI:
    """Percentile bootstrap interval of the recall of `p > tau` (resampling annotated samples).

    Resampling n rows with replacement only matters to recall through the number of
    positives drawn, P* ~ Binomial(n, P/n), and how many of them are hits,
    Binomial(P*, recall); drawing those two counts is the same distribution as resampling
    rows and costs O(n_boot) instead of O(n_boot · n). Resamples without a positive are
    dropped (their recall is undefined).
    """
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError("n_boot must be ≥ 1 and level in (0, 1)")
    pos, s = _annotated(y, s)
    n_pos = int(pos.sum())
    if n_pos == 0:
        return RecallCI(math.nan, math.nan, math.nan)
    point = float(np.sum(pos & (s > tau)) / n_pos)
    rng = np.random.default_rng(seed)
    drawn = rng.binomial(s.size, n_pos / s.size, size=n_boot)
    drawn = drawn[drawn > 0]
    if drawn.size == 0:
        return RecallCI(point, math.nan, math.nan)
    boot = rng.binomial(drawn, point) / drawn
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return RecallCI(point, float(low), float(high))


def overall_auto_pass_rate(scores: np.ndarray, taus: Sequence[float] | np.ndarray) -> float:
    """Share of posts auto-passed by every category (p_k ≤ tau_k for all k); NaN if no post."""
    scores = np.asarray(scores, dtype=np.float64)
    taus_arr = np.asarray(taus, dtype=np.float64)
    if scores.ndim != 2 or taus_arr.shape != (scores.shape[1],):
        raise ValueError(
            f"scores must be [N, K] and taus [K], got {scores.shape}, {taus_arr.shape}"
        )
    if np.isnan(scores).any() or np.isnan(taus_arr).any():
        raise ValueError("scores and taus must not be NaN")
    if scores.shape[0] == 0:
        return math.nan
    return float(np.mean(np.all(scores <= taus_arr, axis=1)))


@dataclass(frozen=True)
class CategoryMetrics:
    """One category's metrics on its own annotated samples (NaN where undefined)."""

    category: str
    n_annotated: int
    n_positive: int
    defined: bool
    undefined_reason: str | None
    pr_auc: float
    r_at_p60: float
    r_at_p60_threshold: float  # torchmetrics sense: positive iff s >= threshold
    apr_r90: float
    tau_r90: float  # service sense: dispatch iff p > tau
    recall_r90: float
    apr_r95: float
    tau_r95: float
    recall_r95: float
    oracle_apr: float  # a perfect ranker at recall 1: the share of annotated negatives
    random_apr_r90: float  # a random router at recall R passes 1 - R
    random_apr_r95: float


@dataclass(frozen=True)
class EvaluationReport:
    """Per-category metrics plus macro averages over the categories where they are defined."""

    categories: dict[str, CategoryMetrics]
    averages: dict[str, float]  # pr_auc, r_at_p60, apr_r90, apr_r95 (NaN if none defined)
    n_defined: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: NaN becomes None (±inf stays a float: tau = -inf is meaningful)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return clean(
            {
                "categories": {k: asdict(v) for k, v in self.categories.items()},
                "averages": dict(self.averages),
                "n_defined": self.n_defined,
            }
        )


def _category_metrics(name: str, y: np.ndarray, s: np.ndarray) -> CategoryMetrics:
    pos, _ = _annotated(y, s)
    n_annotated, n_positive = int(pos.size), int(pos.sum())
    reason = None
    if n_annotated == 0:
        reason = "no annotated samples"
    elif n_positive == 0:
        reason = "no positive samples"
    rap = recall_at_precision(y, s, MIN_PRECISION)
    r90, r95 = (auto_pass_at_recall(y, s, r) for r in RECALL_TARGETS)
    return CategoryMetrics(
        category=name,
        n_annotated=n_annotated,
        n_positive=n_positive,
        defined=reason is None,
        undefined_reason=reason,
        pr_auc=average_precision(y, s),
        r_at_p60=rap.recall,
        r_at_p60_threshold=rap.threshold,
        apr_r90=r90.apr,
        tau_r90=r90.tau,
        recall_r90=r90.achieved_recall,
        apr_r95=r95.apr,
        tau_r95=r95.tau,
        recall_r95=r95.achieved_recall,
        oracle_apr=(n_annotated - n_positive) / n_annotated if n_annotated else math.nan,
        random_apr_r90=1.0 - RECALL_TARGETS[0],
        random_apr_r95=1.0 - RECALL_TARGETS[1],
    )


def evaluate_scores(
    labels: np.ndarray, scores: np.ndarray, categories: Sequence[str]
) -> EvaluationReport:
    """PR-AUC, R@P60, APR@R90 and APR@R95 per category, and their macro averages.

    labels: [N, K] in {-1, 0, 1}; scores: [N, K] probabilities; categories: K names in
    column order.
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != 2 or labels.shape != scores.shape or labels.shape[1] != len(categories):
        raise ValueError(
            f"labels and scores must be [N, {len(categories)}], got {labels.shape}, {scores.shape}"
        )
    per = {
        name: _category_metrics(name, labels[:, k], scores[:, k])
        for k, name in enumerate(categories)
    }
    defined = [m for m in per.values() if m.defined]
    averages = {
        key: float(np.mean([getattr(m, key) for m in defined])) if defined else math.nan
        for key in ("pr_auc", "r_at_p60", "apr_r90", "apr_r95")
    }
    return EvaluationReport(categories=per, averages=averages, n_defined=len(defined))
