"""The FastAPI application: lifespan, error mapping at the edge, the routes."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.service.body_limit import BodySizeLimit
from app.service.errors import ServiceError
from app.service.routes import router
from app.service.settings import Settings
from app.service.state import ServiceState

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model loads when the lifespan starts (uvicorn or a test client)."""
    settings = settings or Settings()
    state = ServiceState(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="RADAR router",
        version="0.1.0",
        summary="Scores each post per risk category and dispatches it only where needed.",
        lifespan=lifespan,
    )
    app.state.radar = state
    app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ServiceError):  # registered for ServiceError only
        return await _unexpected_error(request, exc)
    if exc.status_code in (422, 413):
        request.app.state.radar.metrics.rejected.labels(exc.code).inc()
    return JSONResponse(
        {"error": exc.code, "detail": exc.message},
        status_code=exc.status_code,
        headers=exc.headers(),
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    # Location and message only: echoing the input back could return megabytes of base64.
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in errors]
    request.app.state.radar.metrics.rejected.labels("invalid_request").inc()
    return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # No stack trace or path in the response; the log has them.
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal", "detail": "internal error"}, status_code=500)
