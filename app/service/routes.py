"""HTTP endpoints. Thin: schemas in, named errors out; the work is in state/batcher/engine."""

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from app.feedback.log import DecisionRecord
from app.service.admin import admin_router
from app.service.admission import ARRIVED
from app.service.engine import Decision
from app.service.errors import ClientGoneError, DeadlineExceededError, TooManyPostsError
from app.service.feedback import feedback_router
from app.service.images import PixelBudget
from app.service.intake import to_model_post
from app.service.metrics import Endpoint, UnansweredReason
from app.service.schemas import (
    BatchIn,
    BatchResult,
    ErrorBody,
    Flag,
    PostIn,
    ReadyStatus,
    RouteResult,
)
from app.service.state import ServiceState
from app.service.strict_json import StrictJSONRoute

ERRORS = {
    413: {"model": ErrorBody, "description": "body or batch too large"},
    422: {"model": ErrorBody, "description": "invalid request, or a post the router cannot take"},
    503: {"model": ErrorBody, "description": "queue full or not ready; see Retry-After"},
    504: {"model": ErrorBody, "description": "no answer within RADAR_DEADLINE_MS"},
}


async def get_state(request: Request) -> ServiceState:
    # `async` on purpose: FastAPI runs a plain `def` dependency in a worker thread, one
    # thread hop per request for an attribute read (a GIL convoy under load).
    return request.app.state.radar


State = Annotated[ServiceState, Depends(get_state)]
router = APIRouter(route_class=StrictJSONRoute)


@router.post("/route", response_model=RouteResult, responses=ERRORS, tags=["routing"])
async def route_one(post: PostIn, state: State, request: Request) -> RouteResult:
    """Score one post and say which verticals it goes to."""
    with state.metrics.request_latency.labels("route").time():
        return (await _route(state, [post], request, "route"))[0]


@router.post("/route/batch", response_model=BatchResult, responses=ERRORS, tags=["routing"])
async def route_batch(body: BatchIn, state: State, request: Request) -> BatchResult:
    """Score several posts (at most `RADAR_MAX_POSTS_PER_REQUEST`); answers in order."""
    with state.metrics.request_latency.labels("route_batch").time():
        limit = state.settings.max_posts_per_request
        if len(body.posts) > limit:
            raise TooManyPostsError(f"{len(body.posts)} posts, at most {limit} per request")
        return BatchResult(results=await _route(state, body.posts, request, "route_batch"))


async def _route(
    state: ServiceState, posts: list[PostIn], request: Request, endpoint: Endpoint
) -> list[RouteResult]:
    # From the arrival stamped by the admission middleware: reading and parsing count too.
    started = getattr(request.state, ARRIVED, None) or time.monotonic()
    deadline = state.deadline(started)
    state.active_thresholds()  # 503 at once when not ready
    if state.batcher is None or state.router is None:
        raise RuntimeError("ready without a batcher")
    budget = state.images.budget(deadline)
    try:
        results = await _answer(state, posts, request, deadline, budget)
    finally:
        budget.release()  # the posts' images are no longer held: answered, failed or gone
    state.metrics.record_answer(endpoint, time.monotonic() - started, len(posts))
    return results


async def _answer(
    state: ServiceState,
    posts: list[PostIn],
    request: Request,
    deadline: float,
    budget: PixelBudget,
) -> list[RouteResult]:
    unanswered = _Unanswered(state, posts)
    futures = await _submit(state, posts, deadline, budget, unanswered)
    answers = asyncio.gather(*futures)
    answers.add_done_callback(_retrieve)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            (answers, gone),
            timeout=max(deadline - time.monotonic(), 0),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if answers not in done:
            reason = "client_gone" if gone in done else "deadline"
            unanswered.reason = reason
            if gone in done:
                raise ClientGoneError("the client disconnected")
            raise DeadlineExceededError(f"no answer within {state.settings.deadline_ms:g} ms")
        decisions = answers.result()
    except asyncio.CancelledError:  # the caller's request task cancelled: nobody waits
        unanswered.reason = "client_gone"
        raise
    finally:
        gone.cancel()
        if not answers.done():
            unanswered.give_up(futures)
    results, audited = _results(state, posts, decisions)
    if audited and state.decision_log is not None:
        # Audited decisions are written before their answer leaves: their verdicts come
        # back later and must find them, even if this process is killed in between.
        await asyncio.to_thread(state.decision_log.record_now, audited)
    return results


async def _submit(
    state: ServiceState,
    posts: list[PostIn],
    deadline: float,
    budget: PixelBudget,
    unanswered: "_Unanswered",
) -> list["asyncio.Future[Decision]"]:
    """Admit (503 before any image is decoded: refusing must cost next to nothing under
    overload), decode, queue; the posts count as ahead of later arrivals from admission on."""
    if state.batcher is None:
        raise RuntimeError("ready without a batcher")
    with state.batcher.admitted(len(posts), deadline):
        model_posts = await asyncio.gather(
            *(to_model_post(p, state.images, state.settings, budget) for p in posts)
        )
        futures: list[asyncio.Future[Decision]] = []
        try:
            for i, post in enumerate(model_posts):
                late = functools.partial(unanswered.arrived, i)
                futures.append(state.batcher.submit(post, deadline, late))
        except BaseException:
            unanswered.give_up(futures)  # a full queue halfway: drop what was queued
            raise
        return futures


class _Unanswered:
    """The decisions of one request that its caller will not get, kept in the decision log.

    A request answered 504 (or whose caller hung up) may have had some or all of its posts
    through the model already: those decisions are logged, flagged `unanswered` with the
    reason, instead of thrown away; a retry of the post replaces them. Posts still queued are
    cancelled and never run; a post in the forward at that moment arrives later, through
    the batcher's `unclaimed` callback.
    """

    def __init__(self, state: ServiceState, posts: list[PostIn]) -> None:
        self.state = state
        self.posts = posts
        self.reason: UnansweredReason = "error"  # until the request says why

    def give_up(self, futures: Sequence["asyncio.Future[Decision]"]) -> None:
        """Log the decisions already there, cancel the rest (the batcher drops a cancelled
        post before its forward: a caller that gives up costs no forward pass)."""
        for i, future in enumerate(futures):
            if not future.done():
                future.cancel()
            elif not future.cancelled() and future.exception() is None:
                self.arrived(i, future.result())

    def arrived(self, index: int, decision: Decision) -> None:
        """Log post `index`'s decision as unanswered (buffered: nobody acts on it now)."""
        state = self.state
        if state.router is None:
            return
        state.metrics.unanswered.labels(self.reason).inc()
        if state.decision_log is None:
            return
        post = self.posts[index]
        decided_at = time.time()
        categories = state.router.categories
        audit_rates = state.audit.rates_at(decision.audit_boost, decided_at) if state.audit else {}
        released = [name for name in categories if name not in decision.dispatch]
        audit = state.audit.pick(post.post_id, released, audit_rates) if state.audit else []
        rows = _log_records(
            _route_result(post, decision, audit, state.router.config.model_version),
            categories,
            audit_rates,
            decided_at,
            unanswered=self.reason,
        )
        state.decision_log.record(rows)


def _retrieve(answers: "asyncio.Future[list[Decision]]") -> None:
    # A gather cancelled halfway finishes with CancelledError as its exception (Python
    # 3.11); retrieving it keeps asyncio from logging "exception was never retrieved".
    if not answers.cancelled():
        answers.exception()


async def _disconnect(request: Request) -> None:
    """Return when the client hangs up (once the body is read, `receive` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _results(
    state: ServiceState, posts: list[PostIn], decisions: list[Decision]
) -> tuple[list[RouteResult], list[DecisionRecord]]:
    """The answers, and the decision-log rows of audited posts (written before they leave;
    every other post's rows are buffered here)."""
    if state.router is None:
        raise RuntimeError("decisions without a router")
    model_version = state.router.config.model_version
    categories = state.router.categories
    decided_at = time.time()
    results = []
    audited: list[DecisionRecord] = []
    for post, decision in zip(posts, decisions, strict=True):
        state.metrics.record_post(
            decision.scores, decision.dispatch, categories, decision.fallback_reason
        )
        if state.shadow is not None:
            state.shadow.observe(decision.scores)  # counters only: the shadow never acts
        released = [name for name in categories if name not in decision.dispatch]
        # The rates in force for this decision (a boost of its thresholds version included):
        # the same ones decide the audit and go to the log, where the estimator weights by them.
        audit_rates = state.audit.rates_at(decision.audit_boost, decided_at) if state.audit else {}
        audit = state.audit.pick(post.post_id, released, audit_rates) if state.audit else []
        state.metrics.record_audit(audit)
        result = _route_result(post, decision, audit, model_version)
        if state.decision_log is not None:
            rows = _log_records(result, categories, audit_rates, decided_at)
            if audit:
                audited += rows
            else:
                state.decision_log.record(rows)
        results.append(result)
    return results, audited


def _route_result(
    post: PostIn, decision: Decision, audit: list[str], model_version: str
) -> RouteResult:
    flags = [Flag.FALLBACK] if decision.fallback_reason else []
    return RouteResult(
        post_id=post.post_id,
        scores=decision.scores,
        dispatch=decision.dispatch,
        auto_pass=decision.auto_pass,
        audit=audit,
        thresholds_version=decision.thresholds_version,
        model_version=model_version,
        flags=[*flags, Flag.AUDIT] if audit else flags,
    )


def _log_records(
    result: RouteResult,
    categories: Sequence[str],
    audit_rates: Mapping[str, float],
    decided_at: float,
    unanswered: UnansweredReason | None = None,
) -> list[DecisionRecord]:
    """The decision log's rows for one decided post: one per category; `unanswered` says
    why its caller never got it (None: answered)."""
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
        for name in categories
    ]


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=ReadyStatus, responses={503: {"model": ReadyStatus}}, tags=["health"]
)
async def readyz(state: State) -> JSONResponse:
    """Readiness: model loaded and warm, thresholds valid, batcher running, not stopping."""
    state.refresh_readiness()
    reason = "shutting down" if state.draining else state.not_ready_reason
    body = ReadyStatus(
        ready=reason is None,
        reason=reason,
        model_version=state.router.config.model_version if state.router else None,
        thresholds_version=(
            state.thresholds.active.version
            if state.thresholds and state.thresholds.active
            else None
        ),
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    tags=["health"],
)
async def metrics(state: State) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


router.include_router(admin_router)
router.include_router(feedback_router)
