"""Refuse request bodies over a size limit with 413, before they are read whole."""

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.service.error_body import send_error


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once the streamed body passes the limit.

    An `HTTPException` on purpose: FastAPI re-raises those from its body reading (anything
    else there becomes a generic 400), so the app's handler answers 413 in the usual format.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body over {max_bytes} bytes")


class BodySizeLimit:
    """Pure ASGI middleware: checks Content-Length, then counts streamed bytes.

    A chunked body (no Content-Length) is counted chunk by chunk as the app reads it, so at
    most one chunk past the limit is ever held.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject  # counts a 413 this middleware answers itself

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            # Reached when the body was read outside the app's exception handling: by the
            # admission middleware, which reads routing bodies whole before the app runs.
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        if self.on_reject is not None:
            self.on_reject()
        # The rest of the body is never read: the connection cannot be reused.
        detail = f"request body over {self.max_bytes} bytes"
        await send_error(send, 413, "body_too_large", detail, close=True)
