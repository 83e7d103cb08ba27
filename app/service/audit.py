"""Audit sampling: a small, deterministic share of the decisions the router *released* (a
category it did not dispatch to) is sent to that category's vertical anyway.

Without it nobody sees what the router misses: a released post never reaches a moderator.
The audited ones do, and their verdicts estimate the recall the router really achieves
(misses among audited releases, weighted by 1 / audit rate).

The draw is a hash of (category, post_id), not a random number: a retried post gets the
same answer, replicas agree, and an audit can be reproduced from the decision alone.

After a promotion, the active thresholds file may raise one category's rate for a while
(`audit_boost`, `app.thresholds.AuditBoostEntry`): the new version's recall needs audited
verdicts of its own, and at a lower tau fewer posts are released to audit. The rate applied
is logged with every decision (`audit_rate`), and the estimator weights each audited verdict
by 1 / its own rate, so a rate that changes mid-window keeps the estimate unbiased.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence

from app.thresholds import AuditBoost


class AuditConfigError(ValueError):
    """Audit rates that do not fit the loaded model."""


def audit_draw(post_id: str, category: str) -> float:
    """A uniform number in [0, 1) fixed by (category, post_id)."""
    digest = hashlib.blake2b(f"{category}\x00{post_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class AuditSampler:
    """Which released categories of a post to audit, at a rate per category."""

    def __init__(
        self, default_rate: float, rates: Mapping[str, float], categories: Sequence[str]
    ) -> None:
        unknown = sorted(set(rates) - set(categories))
        if unknown:
            raise AuditConfigError(
                f"RADAR_AUDIT_RATES names categories the model does not have: {unknown} "
                f"(the model's: {list(categories)})"
            )
        self.rates = {name: rates.get(name, default_rate) for name in categories}

    def rates_at(self, boost: Mapping[str, AuditBoost], now: float) -> dict[str, float]:
        """The rates to apply to a decision made at `now` (Unix seconds) under thresholds
        with `boost`: a boost still running raises its category's rate, never lowers it."""
        if not boost:
            return self.rates
        rates = dict(self.rates)
        for name, b in boost.items():
            if now < b.until and name in rates:
                rates[name] = max(rates[name], b.rate)
        return rates

    def pick(
        self, post_id: str, released: Iterable[str], rates: Mapping[str, float] | None = None
    ) -> list[str]:
        """The categories among `released` (not dispatched) whose vertical audits the post,
        at `rates` (default: the service's own, `rates_at` for a boost)."""
        rates = self.rates if rates is None else rates
        return [name for name in released if audit_draw(post_id, name) < rates[name]]
