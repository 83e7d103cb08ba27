"""The running service's parts and their start-up / shutdown order."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

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
from app.service.quality_export import QualityGauges
from app.service.settings import Settings
from app.service.shadow import ShadowThresholds
from app.thresholds import ActiveThresholds, ReloadResult, ThresholdsStore

log = logging.getLogger(__name__)


def pick_device(setting: str) -> torch.device:
    """`auto` takes CUDA when present (bf16 there), the CPU otherwise."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RADAR_DEVICE=cuda but CUDA is not available")
    return torch.device(setting)


class ServiceState:
    """Model, thresholds, batcher and metrics of one service instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.images = ImageLoader(settings)
        self.router: Router | None = None
        self.engine: RouterEngine | None = None
        self.audit: AuditSampler | None = None
        self.shadow: ShadowThresholds | None = None
        self.decision_log: DecisionLog | None = None
        self.quality: QualityGauges | None = None
        self._quality_task: asyncio.Task[None] | None = None
        self._quality_refresh: asyncio.Future[None] | None = None  # the one in its thread now
        self.thresholds: ThresholdsStore | None = None
        self.batcher: DynamicBatcher | None = None
        self.not_ready_reason: str | None = "starting"
        self._watcher: asyncio.Task[None] | None = None
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
        self.not_ready_reason = "loading model"
        try:
            self.router = await asyncio.to_thread(load_router, s.model_dir, device)
        except Exception as exc:  # re-raised: start-up fails, the process exits
            # One clear line before the framework's traceback (a broken store raises
            # ModelStoreError; a truncated backbone file whatever its loader raises).
            log.error("cannot load the router from %s: %s", s.model_dir, exc)
            raise
        try:  # a bad rate map fails start-up, like a bad model store: never silently no audits
            self.audit = AuditSampler(s.audit_rate, s.audit_rates, self.router.categories)
        except AuditConfigError as exc:
            log.error("%s", exc)
            raise
        self.engine = RouterEngine(self.router)
        if s.decision_log_location is not None:
            self.decision_log = DecisionLog(
                s.decision_log_location,
                self.metrics.registry,
                retention_s=s.decision_log_retention_days * 86400,
                max_rows=s.decision_log_max_rows,
            )
            try:
                await asyncio.to_thread(self.decision_log.start)
            except DecisionLogError as exc:
                log.error("%s", exc)
                raise
            self.quality = QualityGauges(self.metrics.registry, self.router.categories)
        version = self.router.config.model_version
        self.metrics.set_model(version)
        self.metrics.init_categories(self.router.categories)
        self.thresholds = ThresholdsStore(s.thresholds_path, self.router.categories, version)
        self.apply_reload(await asyncio.to_thread(self.thresholds.reload))
        if s.shadow_thresholds_path is not None:
            self.shadow = ShadowThresholds(
                s.shadow_thresholds_path, self.router.categories, version, self.metrics.registry
            )
            await asyncio.to_thread(self.shadow.reload)
        self.batcher = DynamicBatcher(
            self._run_batch,
            self.metrics,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            queue_size=s.queue_size,
            retry_after_s=s.retry_after_s,
            model_thread_nice=s.model_thread_nice,
        )
        self.batcher.start()
        self.not_ready_reason = "warming up"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.batcher.executor, self.engine.warm_up)
        self._watcher = loop.create_task(self._watch_thresholds(), name="radar-thresholds")
        if self.quality is not None:
            self._quality_task = loop.create_task(self._refresh_quality(), name="radar-quality")
        self.refresh_readiness()
        log.info("router %s on %s ready=%s", version, device, self.not_ready_reason is None)

    async def stop(self) -> None:
        """Runs after the server drained its requests: watcher, batcher, HTTP client."""
        self.stopping = True
        self.refresh_readiness()
        for task in (self._watcher, self._quality_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.batcher is not None:
            await self.batcher.stop()
        if self._quality_refresh is not None:
            # Cancelling the task leaves its thread running: let it give its connection back
            # before the log's engine is disposed, or the connection is never closed.
            with contextlib.suppress(Exception):
                await self._quality_refresh
        if self.decision_log is not None:  # after the batcher: the last decisions are logged
            await asyncio.to_thread(self.decision_log.stop)
        await self.images.aclose()
        if self._torch_threads_before is not None:
            torch.set_num_threads(self._torch_threads_before)

    def start_draining(self) -> None:
        """The first SIGTERM (`app.service.server`): `/readyz` answers 503 from now on, so
        load balancers stop sending, while routing goes on until the server stops."""
        self.draining = True
        self.metrics.ready.set(0)

    def apply_reload(self, result: ReloadResult | None) -> None:
        """Record a reload attempt in the metrics and the readiness."""
        if result is None:
            return
        if result.status == "refused" and result.reason is not None:
            self.metrics.reload_failures.labels(result.reason).inc()
        if result.active is not None:
            self.metrics.set_thresholds(result.active)
        if result.status == "changed" and result.active is not None:
            # Quality restarts with each version: the old one's decisions say little about it.
            if self.quality is not None:
                self.quality.restart(result.active.version)
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

    def active_thresholds(self) -> ActiveThresholds:
        """The thresholds a new request will use; `NotReadyError` until ready."""
        if self.not_ready_reason is not None or self.thresholds is None:
            raise NotReadyError(f"not ready: {self.not_ready_reason}", self.settings.retry_after_s)
        active = self.thresholds.active
        if active is None:  # unreachable once ready; kept for the type checker
            raise NotReadyError("no valid thresholds", self.settings.retry_after_s)
        return active

    def deadline(self, started: float) -> float:
        return started + self.settings.deadline_ms / 1000

    def pre_admit(self, arrived: float, in_flight: int) -> None:
        """Before a routing request's body is read: a 503 error if it cannot be answered in
        time, as if it were one post (its size is not known yet, so the claims of refused
        large requests wait for the check after the body). Not ready yet: let it through,
        the route answers 503 with the reason."""
        if self.batcher is not None and self.not_ready_reason is None:
            self.batcher.admit(1, self.deadline(arrived), pending=in_flight, claims=False)

    def _run_batch(self, posts: Sequence[Post]) -> list[Decision]:  # on the model thread
        if self.engine is None or self.thresholds is None or self.thresholds.active is None:
            raise RuntimeError("batch before start-up finished")
        # One thresholds version for the whole batch, read once.
        return self.engine.route(posts, self.thresholds.active)

    def refresh_readiness(self) -> None:
        if self.stopping:
            reason: str | None = "shutting down"
        elif self.router is None:
            reason = "model not loaded"
        elif self.thresholds is None or self.thresholds.active is None:
            error = self.thresholds.last_error if self.thresholds else None
            # `problem`, not str(): the reason is served by /readyz and must not show paths.
            reason = f"no valid thresholds: {error.problem}" if error else "no thresholds loaded"
        elif self.batcher is None or not self.batcher.alive:
            reason = "batcher not running"
        elif self._watcher is None:
            reason = "warming up"
        else:
            reason = None
        self.not_ready_reason = reason
        self.metrics.ready.set(1 if reason is None and not self.draining else 0)

    async def _watch_thresholds(self) -> None:
        while True:
            await asyncio.sleep(self.settings.thresholds_poll_s)
            if self.thresholds is None:
                continue
            try:
                self.apply_reload(await asyncio.to_thread(self.thresholds.reload_if_modified))
                if self.shadow is not None:
                    await asyncio.to_thread(self.shadow.reload_if_modified)
            except Exception:  # the watcher must survive anything a file can do
                log.exception("thresholds watcher step failed")

    async def _refresh_quality(self) -> None:
        while True:
            await asyncio.sleep(self.settings.quality_refresh_s)
            if self.quality is None or self.decision_log is None:
                continue
            window_s = self.settings.quality_window_hours * 3600
            shadow = None if self.shadow is None else self.shadow.store.active
            taus = None if shadow is None else shadow.taus
            active = None if self.thresholds is None else self.thresholds.active
            if active is None:
                continue
            self._quality_refresh = asyncio.ensure_future(
                asyncio.to_thread(
                    self.quality.refresh, self.decision_log.engine, window_s, taus, active.version
                )
            )
            try:
                await asyncio.shield(self._quality_refresh)
            except Exception:  # an unreadable log must not end the task: retried next time
                log.exception("online quality refresh failed")

    @staticmethod
    def now() -> float:
        return time.monotonic()
