"""Paired bootstrap of a metric's difference between two systems scored on the same posts.

An ordering claim ("the router beats TF-IDF on PR-AUC") is only as good as its uncertainty:
with 105 `smear` positives, a two-point PR-AUC gap can be noise. `paired_bootstrap` resamples
the test posts with replacement, B times (seeded), and recomputes DESIGN.md's metrics for
both systems on each resample. Both systems see the *same* resampled posts, so what is shared
(an easy post is easy for both) cancels in the difference, and the interval is far narrower
than two separate intervals would suggest: that pairing is what makes the test fair.

- Resampling is over *posts* (rows of the label matrix), once for all categories, so the
  category average's interval keeps the categories' correlation. Each category is then
  measured on the annotated posts of that resample (label -1 excluded), exactly as
  `app.evaluation.metrics` does on the full set; point estimates are that module's.
- A resample is a vector of counts (how often each post was drawn), so one resample's metrics
  are weighted versions of the step-wise curves of `metrics` (ties stay tie groups; a count
  of 0 adds nothing): every resample of a category costs two cumulative sums over its sorted
  posts, vectorised over the B resamples instead of B calls to scikit-learn.
- The interval is the percentile interval at `level` (95 %) of the resampled differences
  a − b. The verdict on "b < a" is "holds" only when the whole interval is above 0,
  "reversed" when it is below 0, "not shown" when it contains 0 ("undefined" when the
  metric is, e.g. no positive). Undefined resamples (no positive drawn) are left out and
  counted.

numpy only: the package does not depend on scikit-learn (tests cross-check against it).
"""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from app.evaluation.metrics import MIN_PRECISION, RECALL_TARGETS, evaluate_scores

METRICS = ("pr_auc", "r_at_p60", "apr_r90", "apr_r95")
AVERAGE = "average"  # the `category` of the macro average's differences
DEFAULT_N_BOOT = 1000
_CHUNK = 250  # resamples per vectorised step: bounds memory at ~[250, N] per array

Verdict = Literal["holds", "not shown", "reversed", "undefined"]


def resample_weights(n_posts: int, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> np.ndarray:
    """Counts `[n_boot, n_posts]`: how often each post is drawn in each resample (rows sum to N).

    Drawing N indices with replacement and counting them is the resample; the counts are what
    the weighted metrics need. Pass the same array to several comparisons to pair them too.
    """
    if n_posts < 1 or n_boot < 1:
        raise ValueError(f"need n_posts ≥ 1 and n_boot ≥ 1, got {n_posts}, {n_boot}")
    rng = np.random.default_rng(seed)
    dtype = np.int32
    weights = np.empty((n_boot, n_posts), dtype=dtype)
    for start in range(0, n_boot, _CHUNK):
        rows = min(_CHUNK, n_boot - start)
        drawn = rng.integers(0, n_posts, size=(rows, n_posts))
        drawn += np.arange(rows)[:, None] * n_posts
        counts = np.bincount(drawn.ravel(), minlength=rows * n_posts)
        weights[start : start + rows] = counts.reshape(rows, n_posts)
    return weights


def weighted_metrics(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`[B, 4]` (PR-AUC, R@P60, APR@R90, APR@R95) of one category under each weight row.

    y: `[n]` in {-1, 0, 1}; s: `[n]` scores; weights: `[B, n]` non-negative integer counts.
    A row of ones gives exactly `metrics.average_precision`, `recall_at_precision` and
    `auto_pass_at_recall`; a row of counts gives them on the resampled multiset. NaN where a
    row has no annotated positive.
    """
    y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
    weights = np.asarray(weights)
    if y.ndim != 1 or s.shape != y.shape or weights.ndim != 2 or weights.shape[1] != y.size:
        raise ValueError(f"need y, s [n] and weights [B, n]: {y.shape}, {s.shape}, {weights.shape}")
    keep = y != -1
    out = np.full((weights.shape[0], len(METRICS)), np.nan)
    if not keep.any():
        return out
    pos, s, weights = y[keep] == 1, s[keep], weights[:, keep]
    if not np.isfinite(s).all():
        raise ValueError("scores of annotated samples must be finite")
    order = np.argsort(-s, kind="stable")
    s_sorted, pos_sorted = s[order], pos[order]
    # Counts are read at the last sample of each tie group, as in metrics._curve.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    for start in range(0, weights.shape[0], _CHUNK):
        w = weights[start : start + _CHUNK][:, order].astype(np.int64)
        tps = np.cumsum(w * pos_sorted, axis=1)[:, last].astype(np.float64)
        alls = np.cumsum(w, axis=1)[:, last].astype(np.float64)
        out[start : start + _CHUNK] = _curve_metrics(tps, alls)
    return out


def _curve_metrics(tps: np.ndarray, alls: np.ndarray) -> np.ndarray:
    """The four metrics from cumulative (TP, dispatched) counts at each distinct threshold.

    A group left empty by its weights repeats the previous point (or is (0, 0) before the
    first drawn sample): it adds no recall, so AP ignores it, and it is excluded from R@P.
    """
    total_pos, total = tps[:, -1], alls[:, -1]
    defined = total_pos > 0
    safe_pos = np.where(defined, total_pos, 1.0)[:, None]
    drawn = alls > 0
    precision = np.divide(tps, alls, out=np.zeros_like(tps), where=drawn)
    recall = tps / safe_pos
    gains = np.diff(tps, prepend=0.0, axis=1)
    result = np.empty((tps.shape[0], len(METRICS)))
    result[:, 0] = np.sum(gains * precision, axis=1) / safe_pos[:, 0]
    qualifies = drawn & (precision >= MIN_PRECISION)
    result[:, 1] = np.max(np.where(qualifies, recall, 0.0), axis=1)
    rows = np.arange(tps.shape[0])
    for column, target in enumerate(RECALL_TARGETS, start=2):
        # recall ends at 1 in every defined row, so some group always qualifies
        j = np.argmax(recall >= target, axis=1)
        result[:, column] = (total - alls[rows, j]) / np.where(total > 0, total, 1.0)
    result[~defined] = np.nan
    return result


def replicate_metrics(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`[B, K + 1, 4]`: each category's metrics per resample, then their average (last index).

    The average of a resample is over the categories defined in that resample (as
    `evaluate_scores` averages over defined categories); NaN if none is.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 2 or scores.shape != labels.shape or weights.shape[1] != labels.shape[0]:
        raise ValueError(
            f"need labels, scores [N, K] and weights [B, N]: "
            f"{labels.shape}, {scores.shape}, {weights.shape}"
        )
    n_cat = labels.shape[1]
    out = np.full((weights.shape[0], n_cat + 1, len(METRICS)), np.nan)
    for k in range(n_cat):
        out[:, k] = weighted_metrics(labels[:, k], scores[:, k], weights)
    per = out[:, :n_cat]
    counted = np.sum(~np.isnan(per), axis=1)
    out[:, n_cat] = np.where(counted > 0, np.nansum(per, axis=1) / np.maximum(counted, 1), np.nan)
    return out


@dataclass(frozen=True)
class Difference:
    """One metric of one category (or the average): a − b with its paired interval."""

    category: str  # a category name, or AVERAGE
    metric: str  # one of METRICS
    a: float  # point estimate of system a on the full test set
    b: float
    difference: float  # a − b
    low: float  # percentile interval of the resampled differences
    high: float
    n_valid: int  # resamples where the metric is defined for both systems
    verdict: Verdict  # on the claim "b < a"


@dataclass(frozen=True)
class PairedBootstrap:
    """Every category's and the average's differences a − b, for the four metrics."""

    a: str  # names of the two systems, for reports
    b: str
    n_posts: int
    n_boot: int
    seed: int
    level: float
    differences: tuple[Difference, ...]

    def get(self, category: str, metric: str) -> Difference:
        """The difference of `metric` for `category` (or AVERAGE)."""
        for item in self.differences:
            if item.category == category and item.metric == metric:
                return item
        raise KeyError((category, metric))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (NaN → None)."""

        def clean(value: Any) -> Any:
            return None if isinstance(value, float) and math.isnan(value) else value

        document = asdict(self)
        document["differences"] = [
            {key: clean(value) for key, value in asdict(item).items()} for item in self.differences
        ]
        return document


def verdict(low: float, high: float) -> Verdict:
    """ "holds" only when the interval excludes 0 on the positive side."""
    if math.isnan(low) or math.isnan(high):
        return "undefined"
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "not shown"


def paired_bootstrap(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    categories: Sequence[str],
    *,
    names: tuple[str, str] = ("a", "b"),
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = 0.95,
    weights: np.ndarray | None = None,
) -> PairedBootstrap:
    """Paired bootstrap of a − b for every category, the average, and the four metrics.

    labels: `[N, K]` in {-1, 0, 1}, shared by both systems; scores_*: `[N, K]` in the same
    column order as `categories`. `weights` (from `resample_weights`) overrides n_boot/seed,
    so that several comparisons on one test set use the very same resamples.
    """
    labels = np.asarray(labels)
    scores_a, scores_b = np.asarray(scores_a), np.asarray(scores_b)
    if not (labels.shape == scores_a.shape == scores_b.shape) or labels.ndim != 2:
        raise ValueError(
            f"labels and both score matrices must be [N, K] alike: "
            f"{labels.shape}, {scores_a.shape}, {scores_b.shape}"
        )
    if labels.shape[1] != len(categories):
        raise ValueError(f"{len(categories)} categories for {labels.shape[1]} columns")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if weights is None:
        weights = resample_weights(labels.shape[0], n_boot, seed)
    elif weights.ndim != 2 or weights.shape[1] != labels.shape[0]:
        raise ValueError(f"weights must be [B, {labels.shape[0]}], got {weights.shape}")
    points = [evaluate_scores(labels, s, categories) for s in (scores_a, scores_b)]
    diffs = replicate_metrics(labels, scores_a, weights) - replicate_metrics(
        labels, scores_b, weights
    )
    alpha = (1.0 - level) / 2.0
    items = []
    for k, category in enumerate((*categories, AVERAGE)):
        for m, metric in enumerate(METRICS):
            a, b = (
                p.averages[metric]
                if category == AVERAGE
                else getattr(p.categories[category], metric)
                for p in points
            )
            column = diffs[:, k, m]
            column = column[~np.isnan(column)]
            if column.size and not (math.isnan(a) or math.isnan(b)):
                low, high = (float(q) for q in np.quantile(column, [alpha, 1.0 - alpha]))
            else:
                low = high = math.nan
            items.append(
                Difference(
                    category, metric, a, b, a - b, low, high, int(column.size), verdict(low, high)
                )
            )
    return PairedBootstrap(
        a=names[0],
        b=names[1],
        n_posts=int(labels.shape[0]),
        n_boot=int(weights.shape[0]),
        seed=seed,
        level=level,
        differences=tuple(items),
    )
