"""Image URLs: fetched with httpx from allowlisted hosts only, no redirects, capped bytes.

A real HTTP server on loopback plays the CDN.
"""

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.service.conftest import png_b64

PNG = base64.b64decode(png_b64(40, 30))


class _CDN(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/cat.png":
            self._send(200, PNG)
        elif self.path == "/big.png":
            self._send(200, PNG + b"\0" * 200_000)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://elsewhere.example/cat.png")
            self.end_headers()
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def cdn() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CDN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def url_post(url: str) -> dict:
    return {"post_id": "u1", "title": "t", "images": [{"url": url}]}


async def test_allowlisted_url_is_fetched_and_scored(running, cdn) -> None:
    async with running(url_allowlist=["127.0.0.1"]) as (client, _):
        response = await client.post("/route", json=url_post(f"{cdn}/cat.png"))
    assert response.status_code == 200, response.text
    assert response.json()["flags"] == []


@pytest.mark.parametrize(
    ("path", "allow", "problem"),
    [
        ("/cat.png", [], "image URLs are disabled"),
        ("/cat.png", ["cdn.example"], "not on the allowlist"),
        ("/redirect", ["127.0.0.1"], "HTTP status 302"),
        ("/missing", ["127.0.0.1"], "HTTP status 404"),
        ("/big.png", ["127.0.0.1"], "larger than the byte limit"),
    ],
)
async def test_refused_urls_are_422_naming_post_and_field(running, cdn, path, allow, problem):
    async with running(url_allowlist=allow, max_image_bytes=100_000) as (client, _):
        response = await client.post("/route", json=url_post(f"{cdn}{path}"))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "u1" in detail and "images[0].url" in detail and problem in detail


async def test_a_dead_host_costs_a_clear_error_not_a_hang(running) -> None:
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    async with running(url_allowlist=["127.0.0.1"], url_connect_timeout_s=1) as (client, _):
        response = await client.post("/route", json=url_post("http://127.0.0.1:9/x.png"))
    assert response.status_code == 422 and "fetch failed" in response.json()["detail"]
