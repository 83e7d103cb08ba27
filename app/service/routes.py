"""HTTP endpoints. Thin: schemas in, named errors out; the work is in state/batcher/engine."""

import asyncio
import hmac
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse

from app.service.engine import Decision
from app.service.errors import (
    AdminDisabledError,
    DeadlineExceededError,
    ForbiddenError,
    NotReadyError,
    ServiceError,
    UnauthorizedError,
)
from app.service.intake import to_model_post
from app.service.schemas import (
    BatchIn,
    BatchResult,
    ErrorBody,
    Flag,
    PostIn,
    ReadyStatus,
    ReloadOutcome,
    RouteResult,
)
from app.service.state import ServiceState

ERRORS = {code: {"model": ErrorBody} for code in (413, 422, 503, 504)}


def get_state(request: Request) -> ServiceState:
    return request.app.state.radar


State = Annotated[ServiceState, Depends(get_state)]
router = APIRouter()


@router.post("/route", response_model=RouteResult, responses=ERRORS, tags=["routing"])
async def route_one(post: PostIn, state: State) -> RouteResult:
    """Score one post and say which verticals it goes to."""
    with state.metrics.request_latency.labels("route").time():
        return (await _route(state, [post]))[0]


@router.post("/route/batch", response_model=BatchResult, responses=ERRORS, tags=["routing"])
async def route_batch(body: BatchIn, state: State) -> BatchResult:
    """Score several posts (at most `RADAR_MAX_POSTS_PER_REQUEST`); answers in order."""
    with state.metrics.request_latency.labels("route_batch").time():
        limit = state.settings.max_posts_per_request
        if len(body.posts) > limit:
            raise _TooManyPosts(f"{len(body.posts)} posts, at most {limit} per request")
        return BatchResult(results=await _route(state, body.posts))


class _TooManyPosts(ServiceError):
    status_code = 413
    code = "too_many_posts"


async def _route(state: ServiceState, posts: list[PostIn]) -> list[RouteResult]:
    started = time.monotonic()
    deadline = state.deadline(started)
    state.active_thresholds()  # 503 at once when not ready
    model_posts = await asyncio.gather(
        *(to_model_post(p, state.images, state.settings) for p in posts)
    )
    if state.batcher is None or state.router is None:
        raise RuntimeError("ready without a batcher")
    futures = []
    try:
        for post in model_posts:
            futures.append(state.batcher.submit(post, deadline))
        decisions = await asyncio.wait_for(
            asyncio.gather(*futures), timeout=max(deadline - time.monotonic(), 0)
        )
    except TimeoutError:
        state.metrics.rejected.labels("deadline").inc()
        raise DeadlineExceededError(f"no answer within {state.settings.deadline_ms:g} ms") from None
    finally:
        for future in futures:  # anything not answered is dropped by the batcher
            future.cancel()
    model_version = state.router.config.model_version
    results = []
    for post, decision in zip(posts, decisions, strict=True):
        state.metrics.record_post(
            decision.scores, decision.dispatch, state.router.categories, decision.fallback_reason
        )
        results.append(_result(post.post_id, decision, model_version))
    return results


def _result(post_id: str, decision: Decision, model_version: str) -> RouteResult:
    return RouteResult(
        post_id=post_id,
        scores=decision.scores,
        dispatch=decision.dispatch,
        auto_pass=decision.auto_pass,
        thresholds_version=decision.thresholds_version,
        model_version=model_version,
        flags=[Flag.FALLBACK] if decision.fallback_reason else [],
    )


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz", response_model=ReadyStatus, responses={503: {"model": ReadyStatus}}, tags=["health"]
)
async def readyz(state: State) -> JSONResponse:
    """Readiness: model loaded and warm, thresholds valid, batcher running."""
    state.refresh_readiness()
    body = ReadyStatus(
        ready=state.not_ready_reason is None,
        reason=state.not_ready_reason,
        model_version=state.router.config.model_version if state.router else None,
        thresholds_version=(
            state.thresholds.active.version
            if state.thresholds and state.thresholds.active
            else None
        ),
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", tags=["health"])
async def metrics(state: State) -> Response:
    """Prometheus text format."""
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


def require_admin(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer-token check for state-changing endpoints; disabled without a configured token."""
    token = state.settings.admin_token
    if token is None:
        raise AdminDisabledError("admin endpoints are disabled (set RADAR_ADMIN_TOKEN)")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise UnauthorizedError("a bearer token is required")
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ForbiddenError("wrong token")


@router.post(
    "/admin/thresholds/reload",
    response_model=ReloadOutcome,
    dependencies=[Depends(require_admin)],
    tags=["admin"],
)
async def reload_thresholds(state: State) -> JSONResponse:
    """Reload the thresholds file now; a refused file leaves the active thresholds in place."""
    if state.thresholds is None:
        raise NotReadyError("the model is not loaded yet", state.settings.retry_after_s)
    result = await asyncio.to_thread(state.thresholds.reload)
    state.apply_reload(result)
    body = ReloadOutcome(
        status=result.status,
        thresholds_version=result.active.version if result.active else None,
        reason=result.reason,
        message=result.message,
    )
    return JSONResponse(body.model_dump(), status_code=422 if result.status == "refused" else 200)
