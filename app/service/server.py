"""Running the app under uvicorn with a graceful, exit-0 shutdown on SIGTERM / SIGINT.

On SIGTERM uvicorn stops accepting connections at once, lets in-flight requests finish
(at most `RADAR_SHUTDOWN_TIMEOUT_S`), then runs the lifespan shutdown (batcher, HTTP client).
Afterwards it re-raises the signal to the handler that was installed before it started: with
the default handler that kills the process (exit status -15), so an orchestrator would log a
crash for a clean stop. `run_server` installs its own handler first, so a drained shutdown
exits 0.

Import this module before torch (the CLI does): it sets `OMP_WAIT_POLICY=PASSIVE` unless the
environment says otherwise, which OpenMP reads once, when torch loads. With the default
policy, forwards on the model thread stalled ~1 s each for the first seconds on a busy
2-core host (docs/reliability.md); passive waiting also leaves the cores to the event loop
and image decoding between forwards.
"""

import asyncio
import heapq
import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.service.settings import Settings

STARTUP_FAILURE = 3  # uvicorn's own exit status when the lifespan start-up fails
MAX_HEADER_BYTES = 16 * 1024
# At the connection limit, this share of it is closed at once (the idle connections that
# opened first): one scan of the connections makes room for many newcomers.
REAP_SHARE = 1 / 16

log = logging.getLogger(__name__)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with two bounds it lacks.

    The request head: a request line plus headers over `MAX_HEADER_BYTES` is refused (a 400,
    connection closed) instead of held whole. Raising in a parser callback makes httptools
    raise `HttpParserCallbackError`, an `HttpParserError`, which uvicorn answers with 400
    "Invalid HTTP request received."

    The connections (`max_connections`, set by `bounded_protocol`): a newcomer at the limit
    makes room by closing idle connections, those holding no request (silent, headers
    incomplete, or keep-alive between requests), the ones opened first. uvicorn's own
    `limit_concurrency` answers 503 to every request once that many connections are open,
    silent ones included: 3,000 silent connections, reopened as soon as closed, had normal
    traffic answered 503 393 times out of 399 (`benchmarks/connection_flood.py`). A
    connection inside a request is never closed here (its deadline bounds it); when every
    connection is inside one, the newcomer is closed at once: the service is full.
    """

    _head_bytes = 0
    max_connections: int | None = None
    opened_at = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened_at = time.monotonic()
        limit = self.max_connections
        if limit is None or len(self.connections) <= limit:
            return
        room = max(1, int(limit * REAP_SHARE))
        if _close_idle(self.connections, room, keep=self) == 0:
            log.warning("%d connections, all inside a request: refusing a new one", limit)
            transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEADER_BYTES:
            raise ValueError(f"request head over {MAX_HEADER_BYTES} bytes")


def _close_idle(connections: set[Any], count: int, keep: object) -> int:
    """Close up to `count` idle connections other than `keep`, the ones opened first."""
    idle = [
        c
        for c in connections
        if c is not keep and _holds_no_request(c) and not c.transport.is_closing()
    ]
    oldest = heapq.nsmallest(count, idle, key=lambda c: getattr(c, "opened_at", 0.0))
    for connection in oldest:
        connection.transport.close()
    if oldest:
        log.warning("at the connection limit: closed %d idle connections for new ones", len(oldest))
    return len(oldest)


def _holds_no_request(connection: Any) -> bool:
    """Not inside a request: headers incomplete, or between requests (uvicorn's `cycle`)."""
    cycle = getattr(connection, "cycle", None)
    return cycle is None or cycle.response_complete


def bounded_protocol(max_connections: int) -> type[BoundedHttpToolsProtocol]:
    """`BoundedHttpToolsProtocol` holding at most `max_connections` connections."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"max_connections": max_connections},
    )


class GuardedServer(uvicorn.Server):
    """`uvicorn.Server` that closes connections holding no request for too long.

    uvicorn times out neither a request's headers nor an idle connection that has started
    sending some: a connection that sends part of its headers and stalls is held forever
    (20,000 of them used every file descriptor, and new clients got EPIPE with nothing
    logged). Twice a second this looks at every connection: one that is not inside a request
    (headers incomplete, or between requests) for more than `header_timeout_s` is closed.
    A request's body is bounded by its deadline in `app.service.admission`.

    It reads uvicorn's per-connection `cycle` (the request in progress; the same attribute
    in its h11 and httptools protocols), the one internal this relies on; the tests that run
    a real uvicorn (tests/service/test_slow_clients.py) would fail if it changed.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        header_timeout_s: float,
        *,
        grace_s: float = 0.0,
        on_draining: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.header_timeout_s = header_timeout_s
        self.closed_stalled = 0  # connections closed for holding no request too long
        self._idle_since: dict[object, float] = {}
        self.grace_s = grace_s
        self.on_draining = on_draining
        self._exit_at: float | None = None  # set by the first SIGTERM: when to stop accepting

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM / SIGINT: fail readiness at once, keep serving for `grace_s`, then stop.

        Stopping to accept at the signal (uvicorn's way) resets the connections the kernel
        had accepted already, 20-24 of them under load, while load balancers still send
        traffic until they see readiness fail. A second signal stops at once.
        """
        if self.grace_s > 0 and self._exit_at is None and not self.should_exit:
            self._exit_at = time.monotonic() + self.grace_s
            log.info(
                "stopping in %g s: readiness fails now, requests are still served", self.grace_s
            )
            if self.on_draining is not None:
                self.on_draining()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if counter % 5 == 0:
            self.close_stalled(time.monotonic())
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)

    def close_stalled(self, now: float) -> int:
        """Close connections idle or still sending headers for over `header_timeout_s`."""
        idle_since: dict[object, float] = {}
        closed = 0
        for connection in list(self.server_state.connections):
            if not _holds_no_request(connection):
                continue  # inside a request: its deadline bounds it
            since = idle_since[connection] = self._idle_since.get(connection, now)
            transport = getattr(connection, "transport", None)
            if now - since > self.header_timeout_s and transport and not transport.is_closing():
                transport.close()
                closed += 1
        self._idle_since = idle_since
        if closed:
            self.closed_stalled += closed
            log.warning(
                "closed %d connections that held no request for over %g s (%d so far)",
                closed,
                self.header_timeout_s,
                self.closed_stalled,
            )
        return closed


def build_server(
    settings: Settings, app: Any, on_draining: Callable[[], None] | None = None
) -> GuardedServer:
    """The uvicorn server for `app` with the connection limits and the shutdown grace of
    `settings`; `on_draining` runs at the first SIGTERM (the app fails readiness)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        # No `limit_concurrency`: it counts silent connections as work and 503s everyone
        # (see BoundedHttpToolsProtocol, which bounds the connections instead).
        timeout_keep_alive=int(settings.keep_alive_s),
        # httptools (uvicorn's fast parser), with the request head bounded: uvicorn's own
        # httptools protocol accumulates the URL and headers without limit. h11 bounds them
        # but served ~18 % fewer requests per second in the load test (42.7 vs 52.0 rps,
        # tests/service/test_load.py, one run each on 2 cores).
        http=bounded_protocol(settings.max_connections),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,  # should h11 be configured instead
    )
    return GuardedServer(
        config,
        settings.header_timeout_s,
        grace_s=settings.shutdown_grace_s,
        on_draining=on_draining,
    )


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful drain (uvicorn exits 3 on a failed start)."""
    from app.service.app import create_app  # imports torch: after the OpenMP setting above

    app = create_app(settings)
    server = build_server(settings, app, on_draining=app.state.radar.start_draining)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        # Before uvicorn takes the signals over: exit right after start-up. After its own
        # graceful shutdown uvicorn calls this again; the server has stopped by then.
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else STARTUP_FAILURE
