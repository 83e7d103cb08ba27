"""One batch through the model and the thresholds: scores → per-category decisions.

Two steps, so that the batcher can overlap them: `prepare` builds a batch's inputs (CPU
work) on the preparing thread while the model thread runs the batch before; `route` runs the
forward and the thresholds on the model thread. A failure of either never auto-passes a
post: it is dispatched to every category and flagged (fail-safe), with a bounded reason for
the metric.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from app.model.post import Post
from app.model.router import PreparedBatch, Router
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


class UnbuiltBatch(tuple[Post, ...]):
    """Posts whose inputs failed to build in `RouterEngine.prepare` (logged there): `route`
    falls back on them at once instead of building again on the model thread."""


class RouterEngine:
    """Scores a batch and applies one thresholds version to all of it."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.categories = router.categories

    def prepare(self, posts: Sequence[Post]) -> PreparedBatch | UnbuiltBatch:
        """Build the inputs of `posts` ahead of `route` (off the model thread, one call at a
        time: `Router.prepare`); never raises: a failure comes back as an `UnbuiltBatch`."""
        try:
            return self.router.prepare(posts)
        except Exception:
            log.exception("inputs failed for a batch of %d posts; dispatching to all", len(posts))
            return UnbuiltBatch(posts)

    def route(self, posts: Sequence[Post], thresholds: ActiveThresholds) -> list[Decision]:
        """Decisions for `posts` (plain, or from `prepare`), in order; never raises for a
        model failure."""
        if isinstance(posts, UnbuiltBatch):
            return [self.fallback(thresholds, "model_error") for _ in posts]
        try:
            probs = self.router.predict_proba(posts)
            if probs.shape != (len(posts), len(self.categories)):
                raise ValueError(f"model returned shape {tuple(probs.shape)} for {len(posts)}")
        except Exception:
            log.exception("forward failed for a batch of %d posts; dispatching to all", len(posts))
            return [self.fallback(thresholds, "model_error") for _ in posts]
        return [self._decide(row, thresholds) for row in probs.tolist()]

    def warm_up(self) -> None:
        """One forward on a dummy post, prepared as served (pinned memory on CUDA), so the
        first request pays no lazy initialisation; raises on failure."""
        with torch.inference_mode():
            self.router.predict_proba(
                self.router.prepare([Post(title="warm-up", ocr_text="warm-up")])
            )

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
