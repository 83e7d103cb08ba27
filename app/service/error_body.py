"""The one shape of every error answer, `{"error": <code>, "detail": ...}`, for each layer that
answers one: the exception handlers (`app.service.app`) and the two ASGI middlewares that
answer before the app runs (`admission`, `body_limit`)."""

import json
from collections.abc import Mapping

from fastapi.responses import JSONResponse
from starlette.types import Send


def error_content(code: str, detail: object, **extra: object) -> dict[str, object]:
    """The error body as a dict: the stable `code`, a human-readable `detail`, extras."""
    return {"error": code, "detail": detail, **extra}


def error_response(
    status: int,
    code: str,
    detail: object,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    """For exception handlers."""
    return JSONResponse(
        error_content(code, detail, **extra), status_code=status, headers=dict(headers or {})
    )


async def send_error(
    send: Send,
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    close: bool = False,
) -> None:
    """For ASGI middleware, which answers with raw `send` messages. `close`: the rest of the
    request body was never read, so the connection cannot be reused."""
    body = json.dumps(error_content(code, detail)).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    if close:
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
