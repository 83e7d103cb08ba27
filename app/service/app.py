"""The FastAPI application: lifespan, error mapping at the edge, the routes."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.service.admission import Admission
from app.service.body_limit import BodySizeLimit
from app.service.error_body import error_response
from app.service.errors import ServiceError
from app.service.routes import router
from app.service.settings import Settings
from app.service.state import ServiceState
from app.service.strict_json import DuplicateKeyError

log = logging.getLogger(__name__)

# Stable codes for the framework's own HTTP errors (unknown path, wrong method, ...).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
MAX_ERRORS_SHOWN = 20  # validation errors listed in a 422; `errors_total` counts them all


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model loads when the lifespan starts (uvicorn or a test client)."""
    settings = settings or Settings()
    state = ServiceState(settings)
    # httpx logs every request line at INFO, and an image URL is request data (signed CDN
    # URLs carry credentials): request data stays out of the log at the default level.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await state.start()
            yield
        finally:
            # Also after a failed start: the model thread and HTTP client must not linger.
            await state.stop()

    app = FastAPI(
        title="RADAR router",
        version="0.1.0",
        summary="Scores each post per risk category and dispatches it only where needed.",
        lifespan=lifespan,
    )
    app.state.radar = state
    app.include_router(router)
    app.add_middleware(Admission, state=state)
    # Added last, the outermost: it counts the bytes of every body as it streams, including
    # the routing bodies that admission reads whole before the app runs.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        on_reject=lambda: state.metrics.count_rejection("body_too_large"),
    )
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ServiceError):  # registered for ServiceError only
        return await _unexpected_error(request, exc)
    if exc.rejection is not None:
        request.app.state.radar.metrics.count_rejection(exc.rejection)
    return error_response(exc.status_code, exc.code, exc.message, exc.headers())


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    # Location and message only: echoing the input back could return megabytes of base64.
    # The first few errors only, and how many there were: a body of many invalid items
    # must not come back as megabytes of errors.
    detail: list[dict[str, object]] = [
        {"loc": [_printable(part) for part in e.get("loc", ())], "msg": _printable(e.get("msg"))}
        for e in errors[:MAX_ERRORS_SHOWN]
    ]
    return _invalid_request(request, detail, total=len(errors))


def _printable(part: object) -> str | int:
    """A location part or message that JSON-encodes: an unknown field's name may hold a lone
    surrogate, which would make the error response itself fail to encode (a 500)."""
    if isinstance(part, int):
        return part
    return str(part).encode("utf-8", "backslashreplace").decode("utf-8")


def _invalid_request(
    request: Request, detail: list[dict[str, object]], total: int | None = None
) -> JSONResponse:
    request.app.state.radar.metrics.count_rejection("invalid_request")
    errors_total = len(detail) if total is None else total
    return error_response(422, "invalid_request", detail, errors_total=errors_total)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        return await _unexpected_error(request, exc)
    if exc.status_code == 400:
        # FastAPI's "error parsing the body": bytes that are not UTF-8, JSON nested past the
        # parser's recursion limit. To the caller it is an invalid request like bad JSON.
        problem = "body is not valid UTF-8 JSON"
        if isinstance(exc.__cause__, RecursionError):
            problem = "body nested too deeply"
        elif isinstance(exc.__cause__, DuplicateKeyError):
            problem = exc.__cause__.message
        return _invalid_request(request, [{"loc": ["body"], "msg": problem}])
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    if exc.status_code == 413:
        request.app.state.radar.metrics.count_rejection("body_too_large")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # No stack trace or path in the response; the log has them.
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(500, "internal", "internal error")
