"""State-changing endpoints, behind a bearer token; without a configured token they are off."""

import asyncio
import hashlib
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse

from app.service.dependencies import State
from app.service.errors import AdminDisabledError, ForbiddenError, UnauthorizedError
from app.service.schemas import ErrorBody, ReloadOutcome
from app.service.strict_json import StrictJSONRoute

admin_router = APIRouter(prefix="/admin", tags=["admin"], route_class=StrictJSONRoute)

# What `require_admin` answers, for the OpenAPI description of every endpoint behind it.
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no bearer token"},
    403: {"model": ErrorBody, "description": "wrong token"},
    404: {"model": ErrorBody, "description": "admin disabled (no RADAR_ADMIN_TOKEN)"},
}


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


async def require_admin(
    state: State, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Bearer-token check for state-changing endpoints; disabled without a configured token.

    `async` so that FastAPI runs it on the event loop, not in a worker thread.
    """
    token = state.settings.admin_token
    if token is None:
        raise AdminDisabledError("admin endpoints are disabled (set RADAR_ADMIN_TOKEN)")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise UnauthorizedError("a bearer token is required")
    # Compare fixed-length digests in constant time: neither the content nor the length of
    # the token leaks through the timing of a wrong guess.
    if not hmac.compare_digest(_digest(given), _digest(token.get_secret_value())):
        raise ForbiddenError("wrong token")


@admin_router.post(
    "/thresholds/reload",
    response_model=ReloadOutcome,
    dependencies=[Depends(require_admin)],
    responses={
        **ADMIN_ERRORS,
        422: {"model": ReloadOutcome, "description": "file refused; the active one stays"},
        503: {"model": ErrorBody, "description": "the model is not loaded yet"},
    },
)
async def reload_thresholds(state: State) -> JSONResponse:
    """Reload the thresholds file now; a refused file leaves the active thresholds in place."""
    result = await asyncio.to_thread(state.started().thresholds.reload)
    state.apply_reload(result)
    body = ReloadOutcome(
        status=result.status,
        thresholds_version=result.active.version if result.active else None,
        reason=result.reason,
        message=result.message,
    )
    return JSONResponse(body.model_dump(), status_code=422 if result.status == "refused" else 200)
