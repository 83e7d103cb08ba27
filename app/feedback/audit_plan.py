"""Audit planning: which audit rate lets the online recall estimate say something, how long
it takes at a given rate, and how many extra posts the audits send to the verticals.

The recall of a category is estimated from audited released posts (`app/feedback/quality.py`):
every dispatched violating post comes back with a verdict (a *hit*, counted), and a released
violating post (a *miss*) is seen only when it is audited. So precision is bought with
audits of released posts, and only of them: a rate of 0.01 audits 1 % of the *released*
decisions, and of those only the share that violates shows a miss.

How many audits: the service's 95 % interval is `recall_interval(hits, k, weight)` (Garwood's
Poisson interval for the k audited misses, each standing for `weight` = 1 / audit rate
released posts, pushed through hits / (hits + misses)). It depends on hits and weight only
through weight / hits. Audit n of the released posts at rate a, over T hours in which
`released_per_hour` posts are released and `hits_per_hour` hits come back: n = a T released,
hits = T hits_per_hour, and weight / hits = released_per_hour / (n hits_per_hour). So the
width the interval reaches depends on n alone (and on the traffic's shape), never on the
rate: the rate only decides how long n audits take, and whether the gauge's window
(`RADAR_QUALITY_WINDOW_HOURS`) holds that many.

`audited_needed` searches the smallest n whose *median* interval width, over the audited
misses k ~ Binomial(n, share of released posts that violate), is within the target, at an
assumed recall. It calls `recall_interval` itself rather than a normal approximation
(width ~ 3.92 se): the interval is asymmetric and, at the few misses a low audit rate sees,
much wider than the normal one (which covered only 87.5-89.6 % at small counts, issue 14), so
a normal plan would promise a precision the gauge never shows. The plan also needs at least
`MIN_AUDITED` audited verdicts in the window, below which the gauge is NaN whatever the width.

Traffic is given per category (`Traffic`) or measured from the decision log
(`measure_traffic`): posts per hour, the share released, and the base rate of violating
posts, from which, at the assumed recall, hits and misses per hour follow.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom
from sqlalchemy import Connection, text

from app.feedback.quality import recall_interval

# `estimate_quality`'s default `min_audited`: with fewer audited verdicts in the window the
# service's recall gauges are NaN (tests/feedback/test_audit_plan.py checks they agree).
MIN_AUDITED = 30
# Beyond this many audited posts a plan is not a plan (a recall of 0.999 at a width of 0.001).
MAX_AUDITED = 10**9
# The k at which `median_width` evaluates the interval: at most this many (evenly spread over
# the binomial's central 1 - 2e-6), each standing for the probability mass around it.
_POINTS = 41
# The search stops once it has bracketed the smallest n within this relative tolerance.
_TOLERANCE = 0.005


class PlanError(ValueError):
    """Traffic or a target the planner cannot work with; the message says which and why."""


@dataclass(frozen=True)
class Traffic:
    """One category's traffic. Every routed post has a decision for every category, so
    `posts_per_hour` is the same for all of them when measured over one stream."""

    category: str
    posts_per_hour: float
    pass_rate: float  # share of the decisions released (not dispatched): the auditable ones
    prevalence: float  # share of all posts that violate the category (its base rate)


@dataclass(frozen=True)
class CategoryPlan:
    """What it takes, for one category, to know its recall to within `width`.

    Rates per hour; `None` where a figure does not exist (`rate_needed` above 1: the window
    cannot hold enough audits even auditing everything; no time at a rate of 0)."""

    category: str
    posts_per_hour: float
    pass_rate: float
    prevalence: float
    recall: float  # assumed
    released_per_hour: float
    hits_per_hour: float  # dispatched violating posts: each comes back with a verdict
    misses_per_hour: float  # released violating posts: seen only when audited
    width: float  # target: high - low of the 95 % interval
    audited_for_width: int  # smallest audited count whose median width is within `width`
    audited_needed: int  # that, and at least `min_audited` (the gauge is NaN below it)
    misses_seen_needed: float  # audited misses expected among them
    median_width: float  # the interval's median width at `audited_needed`
    min_audited: int
    window_hours: float  # the gauge's window (RADAR_QUALITY_WINDOW_HOURS)
    rate_needed: float | None  # to gather `audited_needed` within the window
    shortest_hours: float  # to gather them auditing every released post (a window this long)
    audits_per_hour_needed: float | None
    extra_load_needed: float | None  # audits / dispatched posts of that vertical, at that rate
    rate: float  # proposed (or current) audit rate
    audits_per_hour: float  # at `rate`
    extra_load: float | None  # at `rate`
    hours_needed: float | None  # at `rate`, to gather `audited_needed`
    hours_to_gauge: float | None  # at `rate`, to the first non-NaN gauge (`min_audited`)
    audited_in_window: float  # at `rate`: what the window holds
    reached_in_window: bool  # at `rate`, the gauge's window reaches the width


def interval_width(hits: float, misses_seen: int, weight: float) -> float:
    """Width (high - low) of the service's 95 % recall interval (`recall_interval`)."""
    low, high = recall_interval(hits, misses_seen, weight)
    return high - low


def median_width(n_audited: int, miss_share: float, hits_per_audit: float) -> float:
    """Median width of the recall interval over k ~ Binomial(n_audited, miss_share) audited
    misses. It is evaluated as if every released post of the stretch of traffic that holds
    n_audited of them were audited (weight 1, `hits_per_audit` * n_audited hits): the interval
    depends on hits and weight only through weight / hits, which is the same at any rate that
    gathers n_audited (see the module docstring).

    The width is not monotone in k (it grows with k at recalls above ~0.75 and shrinks below),
    so the median is taken over the whole distribution, not at the median k; at most
    `_POINTS` values of k are evaluated, each carrying the mass of its stretch of k."""
    if n_audited < 1:
        raise PlanError("at least one audited post is needed for an interval")
    hits = hits_per_audit * n_audited
    dist = binom(n_audited, miss_share)
    lo, hi = int(dist.ppf(1e-6)), int(dist.ppf(1 - 1e-6))
    starts = np.unique(np.linspace(lo, hi, num=min(hi - lo + 1, _POINTS)).round().astype(int))
    ends = np.append(starts[1:] - 1, hi)  # stretch i: starts[i] .. ends[i]
    cdf = np.concatenate([[0.0], dist.cdf(ends[:-1]), [1.0]])  # the tails go to the ends
    mass = np.diff(cdf)
    widths = np.array([interval_width(hits, int(k), 1.0) for k in (starts + ends) // 2])
    order = np.argsort(widths)
    at = int(np.searchsorted(np.cumsum(mass[order]), 0.5))
    return float(widths[order][min(at, len(order) - 1)])


def audited_needed(traffic: Traffic, recall: float, width: float) -> tuple[int, float]:
    """The smallest number of audited released posts whose median interval width is within
    `width` (to within 0.5 %), and that width. Doubling, then bisection: the median width
    falls roughly as 1 / sqrt(n)."""
    released, hits, misses = _per_hour(traffic, recall)
    share, hits_per_audit = misses / released, hits / released

    def good(n: int) -> bool:
        return median_width(n, share, hits_per_audit) <= width

    if good(1):
        return 1, median_width(1, share, hits_per_audit)
    lo, hi = 1, 2  # good(lo) is false
    while not good(hi):
        if hi >= MAX_AUDITED:
            raise PlanError(
                f"{traffic.category}: over {MAX_AUDITED:.0e} audited posts for a width of "
                f"{width:g} at recall {recall:g}: ask for a wider interval"
            )
        lo, hi = hi, min(2 * hi, MAX_AUDITED)
    while hi - lo > max(1, _TOLERANCE * lo):
        middle = (lo + hi) // 2
        lo, hi = (lo, middle) if good(middle) else (middle, hi)
    return hi, median_width(hi, share, hits_per_audit)


def plan(
    traffic: Traffic,
    *,
    recall: float,
    width: float,
    window_hours: float,
    rate: float,
    min_audited: int = MIN_AUDITED,
) -> CategoryPlan:
    """The audits one category needs for a 95 % recall interval no wider than `width` at an
    assumed `recall`: how many, at which rate the gauge's window gathers them, how long they
    take at `rate`, and the extra vertical load (see the module docstring)."""
    check_target(recall, width, window_hours, rate)
    released, hits, misses = _per_hour(traffic, recall)
    for_width, _ = audited_needed(traffic, recall, width)
    needed = max(for_width, min_audited)
    dispatched = traffic.posts_per_hour * (1 - traffic.pass_rate)
    rate_needed = needed / (released * window_hours)
    feasible = rate_needed <= 1
    per_hour_needed = rate_needed * released if feasible else None
    audits_per_hour = rate * released
    return CategoryPlan(
        category=traffic.category,
        posts_per_hour=traffic.posts_per_hour,
        pass_rate=traffic.pass_rate,
        prevalence=traffic.prevalence,
        recall=recall,
        released_per_hour=released,
        hits_per_hour=hits,
        misses_per_hour=misses,
        width=width,
        audited_for_width=for_width,
        audited_needed=needed,
        misses_seen_needed=needed * misses / released,
        median_width=median_width(needed, misses / released, hits / released),
        min_audited=min_audited,
        window_hours=window_hours,
        rate_needed=rate_needed if feasible else None,
        shortest_hours=needed / released,
        audits_per_hour_needed=per_hour_needed,
        extra_load_needed=_share(per_hour_needed, dispatched),
        rate=rate,
        audits_per_hour=audits_per_hour,
        extra_load=_share(audits_per_hour, dispatched),
        hours_needed=needed / audits_per_hour if audits_per_hour > 0 else None,
        hours_to_gauge=min_audited / audits_per_hour if audits_per_hour > 0 else None,
        audited_in_window=audits_per_hour * window_hours,
        reached_in_window=audits_per_hour * window_hours >= needed,
    )


def prevalence_from_hits(hits_per_hour: float, posts_per_hour: float, recall: float) -> float:
    """The base rate that, at `recall`, gives the hits per hour the verdicts show: the hits
    are counted (every dispatched post gets a verdict), so only the misses are assumed."""
    return hits_per_hour / (posts_per_hour * recall)


def _per_hour(traffic: Traffic, recall: float) -> tuple[float, float, float]:
    """Released posts, hits and misses per hour; `PlanError` where they make no sense."""
    name = traffic.category
    if not (math.isfinite(traffic.posts_per_hour) and traffic.posts_per_hour > 0):
        raise PlanError(f"{name}: posts per hour must be > 0, not {traffic.posts_per_hour:g}")
    if not 0 < traffic.pass_rate <= 1:
        raise PlanError(
            f"{name}: pass rate {traffic.pass_rate:g}: a category that releases nothing has "
            "nothing to audit (recall is 1 by construction)"
            if traffic.pass_rate == 0
            else f"{name}: pass rate must be in (0, 1], not {traffic.pass_rate:g}"
        )
    if not 0 < traffic.prevalence <= 1:
        raise PlanError(
            f"{name}: base rate must be in (0, 1], not {traffic.prevalence:g} (with no "
            "violating posts recall is undefined)"
        )
    released = traffic.posts_per_hour * traffic.pass_rate
    hits = traffic.posts_per_hour * traffic.prevalence * recall
    misses = traffic.posts_per_hour * traffic.prevalence * (1 - recall)
    if misses > released * (1 + 1e-9):
        raise PlanError(
            f"{name}: at recall {recall:g} a base rate of {traffic.prevalence:g} misses more "
            f"posts ({misses:.4g}/h) than the pass rate {traffic.pass_rate:g} releases "
            f"({released:.4g}/h): the figures do not fit together"
        )
    return released, hits, min(misses, released)


def check_target(recall: float, width: float, window_hours: float, rate: float) -> None:
    """`PlanError` unless the assumed recall, target width, window and rate make sense."""
    if not 0 < recall < 1:
        raise PlanError(f"assumed recall must be in (0, 1), not {recall:g}")
    if not 0 < width < 1:
        raise PlanError(f"interval width must be in (0, 1), not {width:g}")
    if not (math.isfinite(window_hours) and window_hours > 0):
        raise PlanError(f"window must be > 0 hours, not {window_hours:g}")
    if not 0 <= rate <= 1:
        raise PlanError(f"audit rate must be in [0, 1], not {rate:g}")


def _share(part: float | None, whole: float) -> float | None:
    return None if part is None or whole <= 0 else part / whole


@dataclass(frozen=True)
class LoggedTraffic:
    """One category's decisions in the log's window, and the verdicts joined to them."""

    category: str
    decisions: int
    released: int  # not dispatched
    dispatched_violating: int  # hits with a verdict (fallbacks left out, as the estimate does)
    audited: int
    audited_violating: int
    audit_rate: float | None  # mean recorded rate of the released decisions (None: none)


@dataclass(frozen=True)
class LogWindow:
    """What `measure_traffic` read: `hours` from the first decision to the last."""

    hours: float
    categories: dict[str, LoggedTraffic]

    def posts_per_hour(self, name: str) -> float:
        return self.categories[name].decisions / self.hours

    def pass_rate(self, name: str) -> float:
        return self.categories[name].released / self.categories[name].decisions

    def hits_per_hour(self, name: str) -> float:
        return self.categories[name].dispatched_violating / self.hours


_TRAFFIC = """
SELECT d.category, COUNT(*),
    SUM(CASE WHEN d.dispatched = 0 THEN 1 ELSE 0 END),
    SUM(CASE WHEN d.dispatched = 1 AND d.score IS NOT NULL AND f.violating = 1
        THEN 1 ELSE 0 END),
    SUM(CASE WHEN d.audited = 1 THEN 1 ELSE 0 END),
    SUM(CASE WHEN d.audited = 1 AND d.dispatched = 0 AND f.violating = 1 THEN 1 ELSE 0 END),
    AVG(CASE WHEN d.dispatched = 0 THEN d.audit_rate END),
    MIN(d.decided_at), MAX(d.decided_at)
FROM decisions d
LEFT JOIN feedback f ON f.post_id = d.post_id AND f.category = d.category
WHERE d.decided_at >= :since
GROUP BY d.category ORDER BY d.category
"""


def measure_traffic(conn: Connection, since: float | None = None) -> LogWindow:
    """Per-category traffic in the decision log since `since` (Unix seconds; None: all).

    Hits per hour count the dispatched violating verdicts received so far: verdicts still
    pending make them (and the plan's base rate) low for the latest decisions. `PlanError`
    when the window holds no decisions, or spans no time to measure a rate over."""
    params = {"since": float("-inf") if since is None else since}
    rows = [tuple(row) for row in conn.execute(text(_TRAFFIC), params)]
    if not rows:
        raise PlanError("no decisions in the log's window: no traffic to plan for")
    first, last = min(float(r[7]) for r in rows), max(float(r[8]) for r in rows)
    if last <= first:
        raise PlanError(
            "the log's decisions in the window all have one time: too little traffic to "
            "measure a rate; give --posts-per-hour"
        )
    return LogWindow((last - first) / 3600, {str(r[0]): _logged(r) for r in rows})


def _logged(row: tuple[Any, ...]) -> LoggedTraffic:
    name, n, released, hits, audited, audited_violating, rate, *_ = row
    return LoggedTraffic(
        category=str(name),
        decisions=int(n),
        released=int(released),
        dispatched_violating=int(hits),
        audited=int(audited),
        audited_violating=int(audited_violating),
        audit_rate=None if rate is None else float(rate),
    )
