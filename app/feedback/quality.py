"""Online quality per category from the decision log: recall and precision of dispatch,
estimated by inverse-probability weighting (IPW) over the posts that have a verdict.

Only some decisions come back with a verdict: every dispatched post reaches the vertical
(inclusion probability pi = 1), and a released post does only when it was sampled for audit
(pi = its category's `audit_rate` when decided). Weighting each verdict by w = 1/pi makes the
judged rows stand for every decision: Σ w over violating rows estimates how many violating
posts there were, including those released and never seen. For a rule "dispatch iff D":

    recall    = Σ_{violating, D} w / Σ_{violating} w
    precision = Σ_{violating, D} w / Σ_{D} w

D is the decision actually taken (`dispatched`) or, for a threshold tau, `score > tau`. A
candidate tau can be judged from the same verdicts because pi is set by what was actually
done (dispatched or audited), not by the rule under evaluation; each released-and-audited
row stands for 1/audit_rate released posts, which a lower candidate tau might dispatch.

Rows left out: fallback decisions (score NULL: the model failed and the post went to every
vertical) say nothing about the scores, and verdicts on rows neither dispatched nor audited
(pi = 0, or an audit_rate outside (0, 1]) fit no sampling design; both are counted. Without
a single audited verdict, misses are unobservable: recall is None, not 1.0.

Both are ratios of weighted sums (Hajek estimators): consistent, slightly biased on few
audits. `recall_se` is the linearized standard error of recall under that Poisson sampling
(each released post audited independently with probability 1/w):

    se² = Σ_{violating} w (w - 1) (D - recall)² / (Σ_{violating} w)²

Dispatched rows (w = 1) add nothing; it is roughly sqrt(M (1 - r) / r) / V for M violating
released posts, audit rate r and V violating posts. The reported 95 % interval
(`recall_low`, `recall_high`; `recall_interval`) is not recall ± 1.96 se, which covered the
truth only 87.5-89.6 % of the time at small counts: for the decisions taken it is exact in
the misses (tests/feedback/test_quality.py checks its coverage). With no verdict
showing a miss of the rule the formula gives 0, which would claim certainty from nothing seen:
`recall_se` is None then.

Each row carries its own audit_rate, so a rate changed mid-window (an `audit_boost` after a
promotion) is handled: the estimate stays unbiased (tests/feedback/test_quality_versions.py).
`thresholds_version` restricts the estimate to one version's decisions (app/feedback/window.py).
Verdicts still pending are simply absent: a window whose audits come back slower than
dispatched verdicts overstates recall until they arrive.

Aggregation runs in the database (one GROUP BY over decisions LEFT JOIN feedback, using their
(post_id, category) keys), so memory does not grow with the log. The query is written once for
SQLite and PostgreSQL: flags compare to 1 (they are integers), and sums are spelled as CASE
expressions, which both accept (PostgreSQL does not sum booleans).
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scipy.stats import chi2
from sqlalchemy import Connection, text


@dataclass(frozen=True)
class CategoryQuality:
    """IPW estimates for one category, and the counts behind them.

    `tau` is None when judging the decisions actually taken. `n_*` count rows (decisions
    with a verdict unless said otherwise); `estimated_*` are sums of weights, i.e. estimated
    numbers of posts among all `n_decisions`. `estimated_misses` are violating posts the
    rule releases; under the decisions taken that is Σ w over audited violating rows.
    """

    category: str
    tau: float | None
    recall: float | None
    precision: float | None
    n_decisions: int  # decisions in the window, with or without a verdict
    n_dispatched_with_verdict: int
    n_audited_with_verdict: int
    n_violating_found_in_audit: int  # misses of the decisions taken, as observed
    estimated_violating: float
    estimated_misses: float
    n_fallback_with_verdict: int  # score NULL: left out
    n_unexpected: int  # verdict on a row neither dispatched nor audited: left out
    few_audited: bool  # fewer than `min_audited` audited verdicts: recall is a rough guess
    # Standard error of `recall`; None with it, and while the verdicts show no miss of the rule.
    recall_se: float | None = None
    # 95 % interval of `recall` (`recall_interval` for the decisions taken, also when no miss
    # was seen; the delta method's for a candidate tau, None while `recall_se` is).
    recall_low: float | None = None
    recall_high: float | None = None


# One row per decision in the window: w is NULL when the row has no usable verdict.
_QUERY = """
WITH t(category, tau) AS ({taus}),
j AS (
    SELECT d.category AS category, f.violating AS v, d.score IS NULL AS fallback,
        d.dispatched = 1 AS disp,
        CASE WHEN f.violating IS NULL OR d.score IS NULL THEN NULL
             WHEN d.dispatched = 1 THEN 1.0
             WHEN d.audited = 1 AND d.audit_rate > 0 AND d.audit_rate <= 1
                 THEN 1.0 / d.audit_rate
        END AS w,
        CASE WHEN t.tau IS NULL THEN d.dispatched = 1 ELSE d.score > t.tau END AS rule
    FROM decisions d
    LEFT JOIN feedback f ON f.post_id = d.post_id AND f.category = d.category
    LEFT JOIN t ON t.category = d.category
    WHERE d.decided_at >= :since{version}
)
SELECT category, COUNT(*),
    SUM(CASE WHEN w IS NOT NULL AND disp THEN 1 ELSE 0 END),
    SUM(CASE WHEN w IS NOT NULL AND NOT disp THEN 1 ELSE 0 END),
    SUM(CASE WHEN w IS NOT NULL AND NOT disp AND v = 1 THEN 1 ELSE 0 END),
    SUM(CASE WHEN v IS NOT NULL AND fallback THEN 1 ELSE 0 END),
    SUM(CASE WHEN v IS NOT NULL AND NOT fallback AND w IS NULL THEN 1 ELSE 0 END),
    SUM(CASE WHEN w IS NOT NULL AND v = 1 AND NOT rule THEN 1 ELSE 0 END),
    COALESCE(SUM(CASE WHEN v = 1 THEN w END), 0.0),
    COALESCE(SUM(CASE WHEN v = 1 AND rule THEN w END), 0.0),
    COALESCE(SUM(CASE WHEN rule THEN w END), 0.0),
    COALESCE(SUM(CASE WHEN v = 1 AND rule THEN w * (w - 1) END), 0.0),
    COALESCE(SUM(CASE WHEN v = 1 AND NOT rule THEN w * (w - 1) END), 0.0),
    COALESCE(SUM(CASE WHEN w IS NOT NULL AND NOT disp THEN w END), 0.0)
FROM j GROUP BY category ORDER BY category
"""
# No candidate taus: an empty table of the same shape (an empty VALUES is not SQL).
_NO_TAUS = "SELECT CAST(NULL AS TEXT), CAST(NULL AS FLOAT) WHERE 1 = 0"


def estimate_quality(
    conn: Connection,
    categories: Iterable[str] | None = None,
    taus: Mapping[str, float] | None = None,
    since: float | None = None,
    *,
    min_audited: int = 30,
    thresholds_version: str | None = None,
) -> dict[str, CategoryQuality]:
    """IPW recall and precision per category (see the module docstring).

    categories: those to report, in this order, zero counts for any without decisions
    (default: every category in the window, sorted). taus: judge `score > tau` instead of
    the decisions taken; a category missing from it is judged on the decisions taken.
    since: only decisions with decided_at >= since (Unix seconds). thresholds_version: only
    decisions made under that version (after a promotion, the new thresholds' own quality).
    """
    taus = dict(taus or {})
    # The taus as a table to join, one pair of bound parameters per category.
    pairs = [f"(:c{i}, CAST(:t{i} AS FLOAT))" for i in range(len(taus))]
    table = "VALUES " + ", ".join(pairs) if taus else _NO_TAUS
    params: dict[str, object] = {"since": float("-inf") if since is None else since}
    for i, (name, tau) in enumerate(taus.items()):
        params[f"c{i}"], params[f"t{i}"] = name, float(tau)
    version = ""
    if thresholds_version is not None:
        version = " AND d.thresholds_version = :version"
        params["version"] = thresholds_version
    query = text(_QUERY.format(taus=table, version=version))
    rows = {row[0]: tuple(row[1:]) for row in conn.execute(query, params)}
    names = list(rows) if categories is None else list(categories)
    return {name: _quality(name, taus.get(name), rows.get(name), min_audited) for name in names}


def _quality(name: str, tau: float | None, row: tuple | None, min_audited: int) -> CategoryQuality:
    """One category's estimates from its aggregate row (None: no decisions at all)."""
    counts, sums = (row[:7], row[7:]) if row else ((0,) * 7, (0.0,) * 6)
    n, n_disp, n_aud, n_aud_viol, n_fallback, n_unexpected, n_missed = (int(x) for x in counts)
    # float(): PostgreSQL may answer numeric sums (Decimal).
    w_viol, w_hit, w_rule, var_hit, var_miss, w_audited = (float(x) for x in sums)
    # No audited verdict: misses are unobservable, and recall would read 1.0 by default.
    recall = w_hit / w_viol if n_aud > 0 and w_viol > 0 else None
    recall_se = None
    # Without a single verdict the rule missed, the formula gives 0: not a certainty, just
    # nothing seen yet (e.g. 0 misses among 30 audits), so no interval at all.
    low = high = None
    if recall is not None and n_missed > 0:
        recall_se = math.sqrt(var_hit * (1 - recall) ** 2 + var_miss * recall**2) / w_viol
        if tau is not None:  # a candidate's hits include weighted audits: the delta method
            low = max(0.0, recall - 1.96 * recall_se)
            high = min(1.0, recall + 1.96 * recall_se)
    if recall is not None and tau is None:
        # The decisions taken: every hit was dispatched, hence seen. Each audited miss stands
        # for its weight; with none seen, for the audited rows' mean weight (an interval
        # still: no miss among few audits does not make recall 1).
        weight = (w_viol - w_hit) / n_missed if n_missed > 0 else w_audited / n_aud
        low, high = recall_interval(w_hit, n_missed, weight)
    return CategoryQuality(
        category=name,
        tau=tau,
        recall=recall,
        precision=w_hit / w_rule if w_rule > 0 else None,
        n_decisions=n,
        n_dispatched_with_verdict=n_disp,
        n_audited_with_verdict=n_aud,
        n_violating_found_in_audit=n_aud_viol,
        estimated_violating=w_viol,
        estimated_misses=w_viol - w_hit,
        n_fallback_with_verdict=n_fallback,
        n_unexpected=n_unexpected,
        few_audited=n_aud < min_audited,
        recall_se=recall_se,
        recall_low=low,
        recall_high=high,
    )


def recall_interval(
    hits: float, misses_seen: int, weight: float, confidence: float = 0.95
) -> tuple[float, float]:
    """95 % interval of the recall of the decisions taken, H / (H + M).

    Every dispatched violating post comes back with a verdict, so the hits H are counted,
    not estimated: all the uncertainty is in the misses M, of which the audits saw k, each
    standing for `weight` (= 1 / audit rate) released posts. k is Poisson-like in M / weight,
    and Garwood's exact Poisson interval for k, scaled by the weight, bounds M; recall bounds
    follow from H / (H + M). Hand-written rather than from a library because it is this
    composition (an exact count interval pushed through the ratio), not a stock interval.
    The normal interval recall ± 1.96 se covered the truth only 87.5-89.6 % of the time at
    small counts (issue 14): it is symmetric around an estimate whose error is not.
    Poisson is conservative for binomial sampling at audit rates < 1.
    """
    alpha = 1 - confidence
    m_low = weight * (chi2.ppf(alpha / 2, 2 * misses_seen) / 2 if misses_seen > 0 else 0.0)
    m_high = weight * chi2.ppf(1 - alpha / 2, 2 * misses_seen + 2) / 2
    return hits / (hits + m_high), (hits / (hits + m_low) if hits + m_low > 0 else 1.0)


def render_quality(results: Mapping[str, CategoryQuality], title: str) -> str:
    """A text table: one line per category; '-' where an estimate is undefined."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def interval(q: CategoryQuality) -> str:
        if q.recall_low is None or q.recall_high is None:
            return ""
        return f"{100 * q.recall_low:.1f}-{100 * q.recall_high:.1f}"

    head = (
        f"{'category':<12} {'tau':>6} {'recall':>7} {'95% interval':>12} {'precision':>9} "
        f"{'decisions':>9} "
        f"{'disp+v':>7} {'audit+v':>7} {'audit viol':>10} {'est. miss':>9} "
        f"{'fallback':>8} {'unexpect':>8}"
    )
    lines = [title, head]
    for q in results.values():
        lines.append(
            f"{q.category:<12} {'taken' if q.tau is None else f'{q.tau:.4f}':>6} "
            f"{pct(q.recall):>7} {interval(q):>12} {pct(q.precision):>9} {q.n_decisions:>9} "
            f"{q.n_dispatched_with_verdict:>7} {q.n_audited_with_verdict:>7} "
            f"{q.n_violating_found_in_audit:>10} {q.estimated_misses:>9.1f} "
            f"{q.n_fallback_with_verdict:>8} {q.n_unexpected:>8}"
            + ("  (few audits)" if q.few_audited else "")
        )
    if not results:
        lines.append("(no decisions in the window)")
    return "\n".join(lines)
