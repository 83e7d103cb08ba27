"""Slow and stalled clients against a real uvicorn (issue 13, items 1 and 7).

- A request counts toward admission only once its body has arrived, and a body that does not
  arrive before the request's deadline is answered 408 and its connection closed.
- A connection that holds no request (headers incomplete, or idle) is closed after
  `RADAR_HEADER_TIMEOUT_S`; a request head over 16 KiB is refused (a 400: uvicorn's
  httptools protocol, bounded by `BoundedHttpToolsProtocol`).
- Meanwhile normal traffic is served.
"""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from app.service.app import create_app
from app.service.server import GuardedServer, build_server
from app.service.settings import Settings
from tests.service.conftest import post
from tests.service.live import wait_ready

STALLED = 40


@contextmanager
def guarded_server(
    settings: Settings,
) -> Iterator[tuple[str, GuardedServer, threading.Thread]]:
    """The service's own uvicorn server (`build_server`) in a thread, on a loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(settings)
    server = build_server(settings, app, on_draining=app.state.radar.start_draining)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url, timeout_s=60)
        yield url, server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def raw_connection(url: str, data: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=10)
    conn.sendall(data)
    return conn


def read_all(conn: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (or the timeout); then
    this side closes too."""
    conn.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        conn.close()
    return b"".join(chunks)


PARTIAL_BODY = (
    b"POST /route HTTP/1.1\r\nHost: radar\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n" + b'{"post_id": "stalled", "title": "'
)


def test_stalled_bodies_are_not_admitted_and_get_408_at_the_deadline(make_settings) -> None:
    settings = make_settings(deadline_ms=1500, header_timeout_s=30)
    with guarded_server(settings) as (url, _, _):
        stalled = [raw_connection(url, PARTIAL_BODY) for _ in range(STALLED)]
        time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=10) as client:
            normal = [client.post("/route", json=post(f"n{i}")) for i in range(20)]
            ready = client.get("/readyz")
        answers = [read_all(conn, timeout_s=5) for conn in stalled]
        with httpx.Client(base_url=url, timeout=10) as client:
            metrics = client.get("/metrics").text
    assert [r.status_code for r in normal] == [200] * 20, [r.text for r in normal[:3]]
    assert ready.status_code == 200
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"body_timeout" in answer and b"connection: close" in answer.lower()
    assert f'radar_rejected_total{{reason="body_timeout"}} {float(STALLED)}' in metrics


def test_connections_holding_no_request_are_closed(make_settings) -> None:
    settings = make_settings(header_timeout_s=1.0)
    with guarded_server(settings) as (url, server, _):
        started = time.monotonic()
        partial_headers = raw_connection(url, b"POST /route HTTP/1.1\r\nHost: radar\r\n")
        silent = raw_connection(url, b"")
        closed = [read_all(c, timeout_s=10) for c in (partial_headers, silent)]
        took = time.monotonic() - started
        with httpx.Client(base_url=url, timeout=10) as client:
            after = client.post("/route", json=post("after"))
    assert closed == [b"", b""]  # closed without an answer: no request was ever made
    assert 1.0 <= took < 8, took
    assert server.closed_stalled >= 2
    assert after.status_code == 200


def test_silent_connections_at_the_limit_make_room_and_never_refuse_requests(
    make_settings,
) -> None:
    """With uvicorn's `limit_concurrency`, connections that send nothing counted as work:
    once as many were open as the limit, every request was answered 503."""
    limit = 20
    settings = make_settings(max_connections=limit, header_timeout_s=60)
    with guarded_server(settings) as (url, _, _):
        silent = [raw_connection(url, b"") for _ in range(2 * limit)]
        partial = [raw_connection(url, b"POST /route HTTP/1.1\r\nHost: radar\r\n")]
        time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=10) as client:
            # Each request on a connection of its own: a new client must get in.
            normal = []
            for i in range(10):
                normal.append(client.post("/route", json=post(f"n{i}")))
                client.close()
                client = httpx.Client(base_url=url, timeout=10)
            client.close()
        closed = sum(read_all(conn, timeout_s=0.5) == b"" for conn in silent[:limit])
        for conn in [*silent[limit:], *partial]:
            conn.close()
    assert [r.status_code for r in normal] == [200] * 10, [r.text for r in normal[:3]]
    # The first opened were closed for newcomers (well before the 60 s header timeout).
    assert closed == limit


def test_a_connection_inside_a_request_is_never_closed_for_room(make_settings) -> None:
    limit = 4
    settings = make_settings(max_connections=limit, header_timeout_s=60, deadline_ms=3000)
    with guarded_server(settings) as (url, _, _):
        in_request = raw_connection(url, PARTIAL_BODY)  # headers done, body on its way
        time.sleep(0.2)
        silent = [raw_connection(url, b"") for _ in range(3 * limit)]
        in_request.sendall(b'x"}' + b" " * (1000 - len(PARTIAL_BODY.split(b"\r\n\r\n")[1]) - 3))
        answer = read_all(in_request, timeout_s=5)
        for conn in silent:
            conn.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_oversized_headers_are_refused(make_settings) -> None:
    with guarded_server(make_settings()) as (url, _, _):
        flood = raw_connection(
            url, b"GET /healthz HTTP/1.1\r\nHost: radar\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n"
        )
        answer = read_all(flood, timeout_s=5)
        with httpx.Client(base_url=url, timeout=10) as client:
            fine = client.get("/healthz")
    assert answer.startswith(b"HTTP/1.1 4"), answer[:100]
    assert fine.status_code == 200


@pytest.mark.parametrize("grace_s", [0.0, 1.0])
def test_shutdown_does_not_wait_for_stalled_bodies(make_settings, grace_s: float) -> None:
    settings = make_settings(deadline_ms=1000, shutdown_timeout_s=30, shutdown_grace_s=grace_s)
    with guarded_server(settings) as (url, server, thread):
        stalled = [raw_connection(url, PARTIAL_BODY) for _ in range(8)]
        time.sleep(0.2)
        started = time.monotonic()
        server.handle_exit(15, None)  # what SIGTERM calls
        thread.join(timeout=30)
        took = time.monotonic() - started
        for conn in stalled:
            conn.close()
    # The stalled bodies end at their deadline (1 s), not at the 30 s drain timeout.
    assert not thread.is_alive()
    assert took < grace_s + 6, took
