"""Shadow thresholds: a candidate thresholds file decided beside the active one, never acting.

Ops point `RADAR_SHADOW_THRESHOLDS_PATH` at a candidate (e.g. a new `radar calibrate` output).
Every routed post is decided under it as well; only counters move
(`radar_shadow_decisions_total{category,decision}`, `radar_shadow_auto_pass_total`, next to
the active file's own), so a dashboard shows both auto-pass rates side by side before
`radar thresholds promote` makes the candidate act. The file is polled and validated like the
active one; a refused candidate keeps the previous one, and deleting the file ends the shadow.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

from app.service.metrics import ShadowSeries
from app.thresholds import ReloadResult, ThresholdsStore

log = logging.getLogger(__name__)


class ShadowThresholds:
    """The candidate file's store, and its `radar_shadow_*` series (`ShadowSeries`)."""

    def __init__(
        self,
        path: Path,
        categories: Sequence[str],
        model_version: str,
        series: ShadowSeries,
    ) -> None:
        self.store = ThresholdsStore(path, categories, model_version, role="shadow")
        self.categories = tuple(categories)
        self.series = series

    def reload(self) -> None:
        self._apply(self.store.reload())

    def reload_if_modified(self) -> None:
        self._apply(self.store.reload_if_modified())

    def observe(self, scores: dict[str, float]) -> None:
        """Decide one scored post under the shadow, if there is one; counters only."""
        shadow = self.store.active
        if shadow is None or not scores:
            return
        dispatch = set(shadow.dispatch(scores))
        self.series.posts.inc()
        if not dispatch:
            self.series.auto_pass.inc()
        for name in self.categories:
            self.series.decisions.labels(name, "dispatch" if name in dispatch else "pass").inc()

    def _apply(self, result: ReloadResult | None) -> None:
        if result is None:
            return
        if result.status == "refused" and not self.store.path.exists():
            # The candidate was withdrawn: stop shadowing rather than keep a stale one.
            if self.store.active is not None:
                log.info("shadow thresholds %s withdrawn", self.store.active.version)
            self.store.active = None
            self.series.info.clear()
            self.series.threshold.clear()  # no stale taus on the dashboard once the shadow ends
            return
        if result.status == "refused" and result.reason is not None:
            self.series.reload_failures.labels(result.reason).inc()
        if result.active is not None:
            self.series.info.clear()
            self.series.info.labels(result.active.version).set(1)
            for name, tau in result.active.taus.items():
                self.series.threshold.labels(name).set(tau)
