"""Refuse routing requests the router cannot answer in time, before reading their bodies.

Under overload the event loop, not the model, becomes the bottleneck: parsing JSON,
validating and decoding images of requests that the batcher then refuses. A request that
waits behind those is answered late even when it is admitted. This middleware is the first
thing a request meets: it stamps the arrival time (the request's deadline counts from
there) and, when the queue's expected wait already exceeds the time the request would
have, answers 503 + Retry-After without reading the body: refusing costs microseconds.
"""

import json
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from app.service.errors import RetryableError
from app.service.state import ServiceState

ROUTED_PATHS = frozenset({"/route", "/route/batch"})
ARRIVED = "radar_arrived"  # key in the ASGI scope's "state" (Starlette's `request.state`)


class Admission:
    """Pure ASGI middleware in front of the routing endpoints."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state
        self.in_flight = 0  # routing requests inside the app now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ROUTED_PATHS:
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        scope.setdefault("state", {})[ARRIVED] = arrived
        try:
            self.state.pre_admit(arrived, self.in_flight)
        except RetryableError as exc:
            await _refuse(send, exc)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _refuse(send: Send, exc: RetryableError) -> None:
    body = json.dumps({"error": exc.code, "detail": exc.message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in exc.headers().items()),
    ]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
