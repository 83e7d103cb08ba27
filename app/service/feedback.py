"""`POST /feedback`: the verticals' verdicts on posts the router saw, joined to the decision
log (`app/feedback/log.py`) for the online quality estimates (`radar quality`)."""

import asyncio

from fastapi import APIRouter, Depends

from app.feedback.log import DecisionLogError, Verdict
from app.service.admin import ADMIN_ERRORS, require_admin
from app.service.dependencies import State
from app.service.errors import (
    BadPostError,
    DecisionLogUnavailableError,
    FeedbackDisabledError,
    TooManyPostsError,
)
from app.service.schemas import ErrorBody, FeedbackIn, FeedbackOutcome
from app.service.strict_json import StrictJSONRoute

feedback_router = APIRouter(tags=["feedback"], route_class=StrictJSONRoute)


@feedback_router.post(
    "/feedback",
    response_model=FeedbackOutcome,
    dependencies=[Depends(require_admin)],
    responses={
        **ADMIN_ERRORS,
        404: {"model": ErrorBody, "description": "admin or the decision log disabled"},
        413: {"model": ErrorBody, "description": "more than RADAR_MAX_VERDICTS_PER_REQUEST"},
        422: {"model": ErrorBody, "description": "invalid body or an unknown category"},
        503: {"model": ErrorBody, "description": "the decision log's database is unavailable"},
    },
)
async def feedback(body: FeedbackIn, state: State) -> FeedbackOutcome:
    """Store verdicts (violating yes/no per post and category); a repeated verdict replaces
    the earlier one. Answered after the verdicts are committed: an acknowledged verdict is
    never lost."""
    if state.settings.decision_log_location is None:
        raise FeedbackDisabledError("feedback needs the decision log (RADAR_DECISION_LOG_PATH)")
    running = state.started()
    log = running.decision_log
    if log is None:  # configured, so started with the service; kept for the type checker
        raise FeedbackDisabledError("the decision log is not running")
    limit = state.settings.max_verdicts_per_request
    if len(body.verdicts) > limit:
        raise TooManyPostsError(f"{len(body.verdicts)} verdicts, at most {limit} per request")
    categories = set(running.router.categories)
    for i, verdict in enumerate(body.verdicts):
        if verdict.category not in categories:
            problem = f"not a category of the model ({sorted(categories)})"
            raise BadPostError(verdict.post_id, f"verdicts[{i}].category", problem)
    verdicts = [Verdict(v.post_id, v.category, v.violating) for v in body.verdicts]
    try:
        joined = await asyncio.to_thread(log.add_feedback, verdicts)
    except DecisionLogError as exc:  # nothing was committed: the caller sends them again
        raise DecisionLogUnavailableError(str(exc), state.settings.retry_after_s) from exc
    return FeedbackOutcome(accepted=len(verdicts), joined=joined)
