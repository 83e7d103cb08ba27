"""Refuse routing requests the router cannot answer in time, before reading their bodies.

Under overload the event loop, not the model, becomes the bottleneck: parsing JSON,
validating and decoding images of requests that the batcher then refuses. A request that
waits behind those is answered late even when it is admitted. This middleware is the first
thing a request meets: it stamps the arrival time (the request's deadline counts from
there) and, when the queue's expected wait already exceeds the time the request would
have, answers 503 + Retry-After without reading the body: refusing costs microseconds.

A request counts toward admission (`in_flight`) only once its whole body has arrived, and the
body must arrive before the request's deadline (408 `body_timeout` otherwise, connection
closed). Counted from its headers on, 40 connections that sent headers and part of a body
and then stalled made every `/route` answer 503 `overloaded` with the queue empty, for as
long as they stayed open; uvicorn itself has no timeout on reading a body.
"""

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.service.error_body import send_error
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
            if exc.rejection is not None:
                self.state.metrics.count_rejection(exc.rejection)
            await _refuse(send, exc)
            return
        try:
            async with asyncio.timeout_at(_loop_time(self.state.deadline(arrived))):
                body = await _read_body(receive)
        except TimeoutError:
            self.state.metrics.count_rejection("body_timeout")
            problem = "request body not received before the deadline"
            await send_error(send, 408, "body_timeout", problem, close=True)
            return
        except ClientDisconnected:
            self.state.metrics.count_rejection("client_gone")
            return
        self.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1


def _loop_time(monotonic_deadline: float) -> float:
    """A `time.monotonic()` instant on the event loop's clock (`asyncio.timeout_at`)."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


async def _read_body(receive: Receive) -> bytes:
    """The whole request body. The size limit applies as it streams: `BodySizeLimit` wraps
    this middleware and counts the bytes of the `receive` it hands in."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class ClientDisconnected(Exception):
    """The caller hung up before its body arrived: nobody is left to answer."""


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body read already, then the connection's own
    messages (the disconnect the routes watch for)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Send, exc: RetryableError) -> None:
    await send_error(send, exc.status_code, exc.code, exc.message, headers=exc.headers())
