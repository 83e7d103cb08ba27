"""The running service's parts and their start-up / shutdown order."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from app.feedback.log import DecisionLog, DecisionLogError
from app.feedback.window import iso
from app.model.post import Post
from app.model.router import Router
from app.model.store import load_router
from app.service.audit import AuditConfigError, AuditSampler
from app.service.batcher import DynamicBatcher
from app.service.engine import Decision, RouterEngine
from app.service.errors import NotReadyError
from app.service.images import ImageLoader
from app.service.metrics import ServiceMetrics
from app.service.outcomes import PostOutcomes
from app.service.quality_export import QualityGauges
from app.service.settings import Settings
from app.service.shadow import ShadowThresholds
from app.thresholds import ReloadResult, ThresholdsStore

log = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    """`auto` takes CUDA when present (bf16 there), the CPU otherwise."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RADAR_DEVICE=cuda but CUDA is not available")
    return torch.device(setting)


@dataclass(frozen=True)
class Running:
    """The parts a started service routes with. Built whole at the end of start-up, so no
    request ever sees one missing; the Optional fields are features configured off (no
    `RADAR_DECISION_LOG_PATH`: no log and no quality gauges; no shadow file), not parts
    still loading."""

    router: Router
    engine: RouterEngine
    thresholds: ThresholdsStore
    batcher: DynamicBatcher
    outcomes: PostOutcomes
    decision_log: DecisionLog | None
    shadow: ShadowThresholds | None
    quality: QualityGauges | None

    @property
    def model_version(self) -> str:
        return self.router.config.model_version


class ServiceState:
    """One service instance: its settings, metrics and image loader from construction on,
    its `Running` parts once started, and where it stands (readiness, draining)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.images = ImageLoader(settings)
        self.running: Running | None = None
        self.not_ready_reason: str | None = "starting"
        self._phase = "starting"  # the reason while start-up is under way
        self._cleanup = contextlib.AsyncExitStack()  # what start-up started, undone at stop
        self._quality_refresh: asyncio.Future[None] | None = None  # the one in its thread now
        self.stopping = False
        self.draining = False  # SIGTERM seen: readiness fails, requests are still served
        self._torch_threads_before: int | None = None

    async def start(self) -> None:
        """Load the model (a broken store raises and stops start-up), thresholds, warm up."""
        s = self.settings
        device = pick_device(s.device)
        if s.torch_threads:
            # Process-wide in torch; put back at stop for an app embedded in a bigger process.
            self._torch_threads_before = torch.get_num_threads()
            torch.set_num_threads(s.torch_threads)
        # Loading bars from transformers would only clutter the service log.
        transformers_logging.disable_progress_bar()
        self._phase = self.not_ready_reason = "loading model"
        try:
            router = await asyncio.to_thread(load_router, s.model_dir, device)
        except Exception as exc:  # re-raised: start-up fails, the process exits
            # One clear line before the framework's traceback (a broken store raises
            # ModelStoreError; a truncated backbone file whatever its loader raises).
            log.error("cannot load the router from %s: %s", s.model_dir, exc)
            raise
        try:  # a bad rate map fails start-up, like a bad model store: never silently no audits
            audit = AuditSampler(s.audit_rate, s.audit_rates, router.categories)
        except AuditConfigError as exc:
            log.error("%s", exc)
            raise
        engine = RouterEngine(router)
        self.images.fit_for_model(router.fit_image)
        decision_log, quality = await self._start_decision_log(router.categories)
        version = router.config.model_version
        self.metrics.set_model(version)
        self.metrics.init_categories(router.categories)
        thresholds = ThresholdsStore(s.thresholds_path, router.categories, version)
        self._apply_reload(await asyncio.to_thread(thresholds.reload), quality)
        shadow = None
        if s.shadow_thresholds_path is not None:
            series = self.metrics.shadow_series(router.categories)
            shadow = ShadowThresholds(s.shadow_thresholds_path, router.categories, version, series)
            await asyncio.to_thread(shadow.reload)

        def run_batch(posts: Sequence[Post]) -> list[Decision]:  # on the model thread
            active = thresholds.active  # one thresholds version for the whole batch
            if active is None:  # routes refuse before queueing while there is none
                raise NotReadyError("no valid thresholds", s.retry_after_s)
            return engine.route(posts, active)

        batcher = DynamicBatcher(
            run_batch,
            self.metrics,
            prepare=engine.prepare,  # inputs built while the model runs the batch before
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            queue_size=s.queue_size,
            retry_after_s=s.retry_after_s,
            model_thread_nice=s.model_thread_nice,
            # A short batch prepared beside the forward only pays where the forward leaves
            # the CPU free (batcher module doc).
            prepare_short_batches_ahead=router.device.type != "cpu",
        )
        batcher.start()
        self._cleanup.push_async_callback(batcher.stop)
        self._phase = self.not_ready_reason = "warming up"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(batcher.executor, engine.warm_up)
        outcomes = PostOutcomes(
            router.categories, version, self.metrics, audit, shadow, decision_log
        )
        running = Running(
            router, engine, thresholds, batcher, outcomes, decision_log, shadow, quality
        )
        self._start_task(self._watch_thresholds(running), "radar-thresholds")
        if quality is not None and decision_log is not None:
            self._start_task(self._refresh_quality(running), "radar-quality")
        self.running = running
        self.refresh_readiness()
        log.info("router %s on %s ready=%s", version, device, self.not_ready_reason is None)

    async def _start_decision_log(
        self, categories: Sequence[str]
    ) -> tuple[DecisionLog | None, QualityGauges | None]:
        s = self.settings
        if s.decision_log_location is None:
            return None, None
        decision_log = DecisionLog(
            s.decision_log_location,
            retention_s=s.decision_log_retention_days * 86400,
            max_rows=s.decision_log_max_rows,
        )
        try:
            await asyncio.to_thread(decision_log.start)
        except DecisionLogError as exc:
            log.error("%s", exc)
            raise
        # Stopped after the batcher (pushed first, undone last): the last decisions are logged.
        self._cleanup.push_async_callback(asyncio.to_thread, decision_log.stop)
        self.metrics.track_decision_log(decision_log.counts)
        quality = QualityGauges(self.metrics.quality_series(categories), categories)
        return decision_log, quality

    def _start_task(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self._quality_refresh is not None:
                # Cancelling the task leaves its thread running: let it give its connection
                # back before the log's engine is disposed, or it is never closed.
                with contextlib.suppress(Exception):
                    await self._quality_refresh

        self._cleanup.push_async_callback(cancel)

    async def stop(self) -> None:
        """Runs after the server drained its requests (also after a failed start): tasks,
        batcher, decision log, in the reverse order of start-up; then the HTTP client."""
        self.stopping = True
        self.refresh_readiness()
        await self._cleanup.aclose()
        await self.images.aclose()
        if self._torch_threads_before is not None:
            torch.set_num_threads(self._torch_threads_before)

    def start_draining(self) -> None:
        """The first SIGTERM (`app.service.server`): `/readyz` answers 503 from now on, so
        load balancers stop sending, while routing goes on until the server stops."""
        self.draining = True
        self.metrics.ready.set(0)

    def started(self) -> Running:
        """The running parts; `NotReadyError` while start-up is under way."""
        if self.running is None:
            raise NotReadyError(f"not ready: {self._phase}", self.settings.retry_after_s)
        return self.running

    def ready(self) -> Running:
        """The running parts, for a request to route with; `NotReadyError` until ready (no
        valid thresholds, batcher down, stopping)."""
        running = self.started()
        if self.not_ready_reason is not None:
            raise NotReadyError(f"not ready: {self.not_ready_reason}", self.settings.retry_after_s)
        return running

    def apply_reload(self, result: ReloadResult | None) -> None:
        """Record a reload attempt (`POST /admin/thresholds/reload`, the watcher)."""
        self._apply_reload(result, self.started().quality)

    def _apply_reload(self, result: ReloadResult | None, quality: QualityGauges | None) -> None:
        """Record a reload attempt in the metrics and the readiness."""
        if result is None:
            return
        if result.status == "refused" and result.reason is not None:
            self.metrics.reload_failures.labels(result.reason).inc()
        if result.active is not None:
            self.metrics.set_thresholds(result.active)
        if result.status == "changed" and result.active is not None:
            # Quality restarts with each version: the old one's decisions say little about it.
            if quality is not None:
                quality.restart(result.active.version)
            for name, boost in result.active.audit_boost.items():
                if boost.until > time.time():
                    log.info(
                        "audit boost: %s audited at a rate of %g until %s (thresholds %s)",
                        name,
                        boost.rate,
                        iso(boost.until),
                        result.active.version,
                    )
        self.refresh_readiness()

    def deadline(self, started: float) -> float:
        return started + self.settings.deadline_ms / 1000

    def pre_admit(self, arrived: float, in_flight: int) -> None:
        """Before a routing request's body is read: a 503 error if it cannot be answered in
        time, as if it were one post (its size is not known yet, so the claims of refused
        large requests wait for the check after the body). Not ready yet: let it through,
        the route answers 503 with the reason."""
        if self.running is not None and self.not_ready_reason is None:
            self.running.batcher.admission.admit(
                1, self.deadline(arrived), pending=in_flight, claims=False
            )

    def refresh_readiness(self) -> None:
        running = self.running
        if self.stopping:
            reason: str | None = "shutting down"
        elif running is None:
            reason = self._phase
        elif running.thresholds.active is None:
            error = running.thresholds.last_error
            # `problem`, not str(): the reason is served by /readyz and must not show paths.
            reason = f"no valid thresholds: {error.problem}" if error else "no thresholds loaded"
        elif not running.batcher.alive:
            reason = "batcher not running"
        else:
            reason = None
        self.not_ready_reason = reason
        self.metrics.ready.set(1 if reason is None and not self.draining else 0)

    async def _watch_thresholds(self, running: Running) -> None:
        while True:
            await asyncio.sleep(self.settings.thresholds_poll_s)
            try:
                result = await asyncio.to_thread(running.thresholds.reload_if_modified)
                self._apply_reload(result, running.quality)
                if running.shadow is not None:
                    await asyncio.to_thread(running.shadow.reload_if_modified)
            except Exception:  # the watcher must survive anything a file can do
                log.exception("thresholds watcher step failed")

    async def _refresh_quality(self, running: Running) -> None:
        quality, decision_log = running.quality, running.decision_log
        if quality is None or decision_log is None:
            return
        while True:
            await asyncio.sleep(self.settings.quality_refresh_s)
            window_s = self.settings.quality_window_hours * 3600
            shadow = None if running.shadow is None else running.shadow.store.active
            taus = None if shadow is None else shadow.taus
            active = running.thresholds.active
            if active is None:
                continue
            self._quality_refresh = asyncio.ensure_future(
                asyncio.to_thread(
                    quality.refresh, decision_log.engine, window_s, taus, active.version
                )
            )
            try:
                await asyncio.shield(self._quality_refresh)
            except Exception:  # an unreadable log must not end the task: retried next time
                log.exception("online quality refresh failed")

    @staticmethod
    def now() -> float:
        return time.monotonic()
