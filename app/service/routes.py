"""HTTP endpoints. Thin: schemas in, named errors out; the work is in the batcher, the
engine and the step after the model (`app.service.outcomes`)."""

import asyncio
import functools
import time
from collections.abc import Sequence

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.service.admin import admin_router
from app.service.admission import ARRIVED
from app.service.batcher import DynamicBatcher
from app.service.dependencies import State
from app.service.engine import Decision
from app.service.errors import ClientGoneError, DeadlineExceededError, TooManyPostsError
from app.service.feedback import feedback_router
from app.service.images import PixelBudget
from app.service.intake import to_model_post
from app.service.metrics import Endpoint, UnansweredReason
from app.service.outcomes import PostOutcomes
from app.service.schemas import (
    BatchIn,
    BatchResult,
    ErrorBody,
    PostIn,
    ReadyStatus,
    RouteResult,
)
from app.service.state import Running, ServiceState
from app.service.strict_json import StrictJSONRoute

ERRORS = {
    413: {"model": ErrorBody, "description": "body or batch too large"},
    422: {"model": ErrorBody, "description": "invalid request, or a post the router cannot take"},
    503: {"model": ErrorBody, "description": "queue full or not ready; see Retry-After"},
    504: {"model": ErrorBody, "description": "no answer within RADAR_DEADLINE_MS"},
}


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
    running = state.ready()  # 503 at once when not ready
    budget = state.images.budget(deadline)
    try:
        results = await _answer(state, running, posts, request, deadline, budget)
    finally:
        budget.release()  # the posts' images are no longer held: answered, failed or gone
    state.metrics.record_answer(endpoint, time.monotonic() - started, len(posts))
    return results


async def _answer(
    state: ServiceState,
    running: Running,
    posts: list[PostIn],
    request: Request,
    deadline: float,
    budget: PixelBudget,
) -> list[RouteResult]:
    unanswered = _Unanswered(running.outcomes, posts)
    futures = await _submit(state, running.batcher, posts, deadline, budget, unanswered)
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
    results, audited = running.outcomes.answered([p.post_id for p in posts], decisions)
    if audited and running.decision_log is not None:
        # Audited decisions are written before their answer leaves: their verdicts come
        # back later and must find them, even if this process is killed in between.
        await asyncio.to_thread(running.decision_log.record_now, audited)
    return results


async def _submit(
    state: ServiceState,
    batcher: DynamicBatcher,
    posts: list[PostIn],
    deadline: float,
    budget: PixelBudget,
    unanswered: "_Unanswered",
) -> list["asyncio.Future[Decision]"]:
    """Admit (503 before any image is decoded: refusing must cost next to nothing under
    overload), decode, queue; the posts count as ahead of later arrivals from admission on."""
    with batcher.admitted(len(posts), deadline):
        model_posts = await asyncio.gather(
            *(to_model_post(p, state.images, state.settings, budget) for p in posts)
        )
        futures: list[asyncio.Future[Decision]] = []
        try:
            for i, post in enumerate(model_posts):
                late = functools.partial(unanswered.arrived, i)
                futures.append(batcher.submit(post, deadline, late))
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

    def __init__(self, outcomes: PostOutcomes, posts: list[PostIn]) -> None:
        self.outcomes = outcomes
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
        """Log post `index`'s decision as unanswered."""
        self.outcomes.unanswered(self.posts[index].post_id, decision, self.reason)


def _retrieve(answers: "asyncio.Future[list[Decision]]") -> None:
    # A gather cancelled halfway finishes with CancelledError as its exception (Python
    # 3.11); retrieving it keeps asyncio from logging "exception was never retrieved".
    if not answers.cancelled():
        answers.exception()


async def _disconnect(request: Request) -> None:
    """Return when the client hangs up (once the body is read, `receive` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
    running = state.running
    active = running.thresholds.active if running else None
    body = ReadyStatus(
        ready=reason is None,
        reason=reason,
        model_version=running.model_version if running else None,
        thresholds_version=active.version if active else None,
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
