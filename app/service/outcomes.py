"""The step after the model: what each decided post becomes.

One place turns a `Decision` into everything that follows from it: the metrics (scores,
decisions, fallbacks, audits), the shadow thresholds' counters, the audit draw at the rates
in force for the thresholds version that decided, the answer (`RouteResult`) and the
decision log's rows. The routes call it for the posts they answer and for the decisions
whose caller never got them; `benchmarks/litserve_router.py` calls it too, so the serving
comparison does the same work per post as `/route`.
"""

import time
from collections.abc import Mapping, Sequence

from app.feedback.log import DecisionLog, DecisionRecord
from app.service.audit import AuditSampler
from app.service.engine import Decision
from app.service.metrics import ServiceMetrics, UnansweredReason
from app.service.schemas import Flag, RouteResult
from app.service.shadow import ShadowThresholds


class PostOutcomes:
    """Metrics, shadow, audit, answer and log rows of decided posts, for one loaded model.

    `shadow` and `decision_log` are None where they are not configured
    (`RADAR_SHADOW_THRESHOLDS_PATH`, `RADAR_DECISION_LOG_PATH`).
    """

    def __init__(
        self,
        categories: Sequence[str],
        model_version: str,
        metrics: ServiceMetrics,
        audit: AuditSampler,
        shadow: ShadowThresholds | None = None,
        decision_log: DecisionLog | None = None,
    ) -> None:
        self.categories = tuple(categories)
        self.model_version = model_version
        self.metrics = metrics
        self.audit = audit
        self.shadow = shadow
        self.decision_log = decision_log

    def answered(
        self, post_ids: Sequence[str], decisions: Sequence[Decision]
    ) -> tuple[list[RouteResult], list[DecisionRecord]]:
        """The answers, and the log rows of the audited posts among them, which the caller
        writes before the answers leave (`DecisionLog.record_now`): their verdicts come back
        later and must find them. Every other post's rows are buffered here."""
        decided_at = time.time()
        results: list[RouteResult] = []
        audited: list[DecisionRecord] = []
        for post_id, decision in zip(post_ids, decisions, strict=True):
            self.metrics.record_post(
                decision.scores, decision.dispatch, self.categories, decision.fallback_reason
            )
            if self.shadow is not None:
                self.shadow.observe(decision.scores)  # counters only: the shadow never acts
            audit_rates, audit = self._audit(post_id, decision, decided_at)
            self.metrics.record_audit(audit)
            result = self._result(post_id, decision, audit)
            if self.decision_log is not None:
                rows = self._rows(result, audit_rates, decided_at)
                if audit:
                    audited += rows
                else:
                    self.decision_log.record(rows)
            results.append(result)
        return results, audited

    def unanswered(self, post_id: str, decision: Decision, reason: UnansweredReason) -> None:
        """A decision its caller never got (504, hung up): counted and logged, flagged with
        `reason` (buffered: nobody acts on it now; a retry of the post replaces it)."""
        self.metrics.unanswered.labels(reason).inc()
        if self.decision_log is None:
            return
        decided_at = time.time()
        audit_rates, audit = self._audit(post_id, decision, decided_at)
        result = self._result(post_id, decision, audit)
        self.decision_log.record(self._rows(result, audit_rates, decided_at, reason))

    def _audit(
        self, post_id: str, decision: Decision, decided_at: float
    ) -> tuple[dict[str, float], list[str]]:
        # The rates in force for this decision (a boost of its thresholds version included):
        # the same ones decide the audit and go to the log, where the estimator weights by them.
        rates = self.audit.rates_at(decision.audit_boost, decided_at)
        released = [name for name in self.categories if name not in decision.dispatch]
        return rates, self.audit.pick(post_id, released, rates)

    def _result(self, post_id: str, decision: Decision, audit: list[str]) -> RouteResult:
        flags = [Flag.FALLBACK] if decision.fallback_reason else []
        return RouteResult(
            post_id=post_id,
            scores=decision.scores,
            dispatch=decision.dispatch,
            auto_pass=decision.auto_pass,
            audit=audit,
            thresholds_version=decision.thresholds_version,
            model_version=self.model_version,
            flags=[*flags, Flag.AUDIT] if audit else flags,
        )

    def _rows(
        self,
        result: RouteResult,
        audit_rates: Mapping[str, float],
        decided_at: float,
        unanswered: UnansweredReason | None = None,
    ) -> list[DecisionRecord]:
        """The decision log's rows for one decided post: one per category; `unanswered`
        says why its caller never got it (None: answered)."""
        return [
            DecisionRecord(
                post_id=result.post_id,
                category=name,
                score=result.scores.get(name),  # none for a fallback
                dispatched=name in result.dispatch,
                audited=name in result.audit,
                audit_rate=audit_rates.get(name, 0.0),
                thresholds_version=result.thresholds_version,
                model_version=result.model_version,
                decided_at=decided_at,
                unanswered=unanswered,
            )
            for name in self.categories
        ]
