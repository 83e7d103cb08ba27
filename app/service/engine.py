"""One batch through the model and the thresholds: scores → per-category decisions.

Runs on the model thread. A failure of the model never auto-passes a post: it is dispatched
to every category and flagged (fail-safe), with a bounded reason for the metric.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from app.model.post import Post
from app.model.router import Router
from app.thresholds import ActiveThresholds, AuditBoost

log = logging.getLogger(__name__)

FallbackReason = Literal["model_error", "bad_output"]


@dataclass(frozen=True)
class Decision:
    """What the router decided for one post, with the thresholds version that decided it."""

    scores: dict[str, float]
    dispatch: list[str]
    thresholds_version: str
    fallback_reason: FallbackReason | None = None
    # That version's audit boost: the audit rates follow the thresholds that decided.
    audit_boost: Mapping[str, AuditBoost] = field(default_factory=dict)

    @property
    def auto_pass(self) -> bool:
        return not self.dispatch


class RouterEngine:
    """Scores a batch and applies one thresholds version to all of it."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.categories = router.categories

    def route(self, posts: Sequence[Post], thresholds: ActiveThresholds) -> list[Decision]:
        """Decisions for `posts`, in order; never raises for a model failure."""
        try:
            probs = self.router.predict_proba(posts)
            if probs.shape != (len(posts), len(self.categories)):
                raise ValueError(f"model returned shape {tuple(probs.shape)} for {len(posts)}")
        except Exception:
            log.exception("forward failed for a batch of %d posts; dispatching to all", len(posts))
            return [self.fallback(thresholds, "model_error") for _ in posts]
        return [self._decide(row, thresholds) for row in probs.tolist()]

    def warm_up(self) -> None:
        """One forward on a dummy post, so the first request pays no lazy initialisation."""
        with torch.inference_mode():
            self.router.predict_proba([Post(title="warm-up", ocr_text="warm-up")])

    def fallback(self, thresholds: ActiveThresholds, reason: FallbackReason) -> Decision:
        return Decision(
            {}, list(self.categories), thresholds.version, reason, thresholds.audit_boost
        )

    def _decide(self, row: list[float], thresholds: ActiveThresholds) -> Decision:
        if not all(math.isfinite(p) for p in row):
            return self.fallback(thresholds, "bad_output")
        scores = dict(zip(self.categories, row, strict=True))
        return Decision(
            scores, thresholds.dispatch(scores), thresholds.version, None, thresholds.audit_boost
        )
