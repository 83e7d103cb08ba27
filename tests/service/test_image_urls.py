"""Image URLs: fetched with httpx from allowlisted hosts only, no redirects, capped bytes.

A real HTTP server on loopback plays the CDN.
"""

import asyncio
import base64
import gzip
import ipaddress
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.service import fetch
from app.service.fetch import is_public
from tests.service.conftest import png_b64, post

PNG = base64.b64decode(png_b64(40, 30))


def _gzip_bomb(inflated: int = 64 * 2**20) -> bytes:
    """gzip of gzip of `inflated` zero bytes: 64 MiB in a few hundred bytes."""
    inner = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    zeros = b"\0" * 2**20
    once = b"".join(inner.compress(zeros) for _ in range(inflated // len(zeros)))
    return gzip.compress(once + inner.flush(), compresslevel=9, mtime=0)


GZIP_BOMB = _gzip_bomb()


class _CDN(BaseHTTPRequestHandler):
    hosts_seen: list[str] = []  # noqa: RUF012  (reset by the fixture)

    def do_GET(self) -> None:
        _CDN.hosts_seen.append(self.headers.get("Host", ""))
        if self.path == "/slow.png":
            self._trickle()
        elif self.path == "/cat.png":
            self._send(200, PNG)
        elif self.path == "/big.png":
            self._send(200, PNG + b"\0" * 200_000)
        elif self.path in ("/bomb.png", "/bomb-chunked.png"):
            self._bomb(chunked=self.path == "/bomb-chunked.png")
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://elsewhere.example/cat.png")
            self.end_headers()
        else:
            self._send(404, b"no")

    def _trickle(self) -> None:
        """Headers at once, then a byte every 0.1 s for 4 s: each read is quick, the whole
        never arrives in time."""
        self.send_response(200)
        self.send_header("Content-Length", "40")
        self.end_headers()
        try:
            for _ in range(40):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the router hung up: that is the point
            pass

    def _bomb(self, chunked: bool) -> None:
        """A few hundred bytes that inflate to 64 MiB: `Content-Encoding: gzip, gzip`."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Encoding", "gzip, gzip")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(GZIP_BOMB), GZIP_BOMB))
        else:
            self.send_header("Content-Length", str(len(GZIP_BOMB)))
            self.end_headers()
            self.wfile.write(GZIP_BOMB)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def cdn() -> Iterator[str]:
    _CDN.hosts_seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CDN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def url_post(url: str) -> dict:
    return {"post_id": "u1", "title": "t", "images": [{"url": url}]}


async def test_allowlisted_url_is_fetched_and_scored(running, cdn) -> None:
    async with running(url_allowlist=["127.0.0.1"], url_allow_private_networks=True) as (client, _):
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
        ("/bomb.png", ["127.0.0.1"], "compressed response refused (Content-Encoding: gzip, gzip)"),
        ("/bomb-chunked.png", ["127.0.0.1"], "compressed response refused"),
    ],
)
async def test_refused_urls_are_422_naming_post_and_field(running, cdn, path, allow, problem):
    settings = {"url_allowlist": allow, "max_image_bytes": 100_000}
    async with running(url_allow_private_networks=True, **settings) as (client, _):
        response = await client.post("/route", json=url_post(f"{cdn}{path}"))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "u1" in detail and "images[0].url" in detail and problem in detail


async def test_a_dead_host_costs_a_clear_error_not_a_hang(running) -> None:
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    settings = {"url_allowlist": ["127.0.0.1"], "url_connect_timeout_s": 1}
    async with running(url_allow_private_networks=True, **settings) as (client, _):
        response = await client.post("/route", json=url_post("http://127.0.0.1:9/x.png"))
    assert response.status_code == 422 and "fetch failed" in response.json()["detail"]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",  # noqa: S104  (an address under test, not a bind)
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "224.0.0.1",  # multicast
    ],
)
def test_non_public_addresses_are_recognised(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:1.1.1.1"])
def test_public_addresses_pass(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))


async def test_private_addresses_are_refused_after_resolution(running, cdn) -> None:
    port = cdn.rsplit(":", 1)[1]
    urls = [
        f"http://localhost:{port}/cat.png",  # a name that resolves to loopback
        f"{cdn}/cat.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/cat.png",
    ]
    allow = ["localhost", "127.0.0.1", "169.254.169.254", "::ffff:127.0.0.1"]
    async with running(url_allowlist=allow) as (client, _):
        for url in urls:
            response = await client.post("/route", json=url_post(url))
            assert response.status_code == 422, (url, response.text)
            assert "resolves to a private or reserved address" in response.json()["detail"], url
    assert _CDN.hosts_seen == []  # refused before any connection


async def test_every_dns_answer_must_be_public(running, monkeypatch) -> None:
    async def mixed(host: str, port: int) -> list:
        return [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.7")]

    monkeypatch.setattr(fetch, "resolve", mixed)
    async with running(url_allowlist=["cdn.test"]) as (client, _):
        response = await client.post("/route", json=url_post("http://cdn.test/a.png"))
    assert response.status_code == 422 and "private" in response.json()["detail"]


async def test_the_checked_address_is_the_one_connected_to(running, cdn, monkeypatch) -> None:
    # "cdn.test" resolves nowhere on this machine: the fetch can only succeed by connecting
    # to the address our resolver returned, with the name in the Host header. A second
    # resolution (DNS rebinding) would get another address; there must be none.
    answers = iter(["127.0.0.1", "10.9.9.9"])
    calls = []

    async def rebinding(host: str, port: int) -> list:
        calls.append(host)
        return [ipaddress.ip_address(next(answers))]

    monkeypatch.setattr(fetch, "resolve", rebinding)
    port = cdn.rsplit(":", 1)[1]
    settings = {"url_allowlist": ["cdn.test"], "url_allow_private_networks": True}
    async with running(**settings) as (client, _):
        response = await client.post("/route", json=url_post(f"http://cdn.test:{port}/cat.png"))
    assert response.status_code == 200, response.text
    assert calls == ["cdn.test"]
    assert _CDN.hosts_seen == [f"cdn.test:{port}"]


async def test_a_slow_host_costs_its_post_a_422_within_the_deadline(running, cdn) -> None:
    settings = {"url_allowlist": ["127.0.0.1"], "url_allow_private_networks": True}
    async with running(deadline_ms=1500, **settings) as (client, _):
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow = asyncio.create_task(client.post("/route", json=url_post(f"{cdn}/slow.png")))
        # Other callers meanwhile: answered normally, not held up by the slow fetch.
        others = [await client.post("/route", json=post(f"n{i}")) for i in range(5)]
        others_done = loop.time() - started
        response = await slow
        elapsed = loop.time() - started
    assert [r.status_code for r in others] == [200] * 5
    assert others_done < 1.2
    assert response.status_code == 422, response.text
    assert "images[0].url: fetch timed out" in response.json()["detail"]
    assert 1.0 < elapsed < 2.5  # the deadline (1.5 s) and not the host's 4 s


async def test_fetch_budget_setting_bounds_each_image(running, cdn) -> None:
    settings = {"url_allowlist": ["127.0.0.1"], "url_allow_private_networks": True}
    async with running(url_fetch_timeout_s=0.3, **settings) as (client, _):
        response = await client.post("/route", json=url_post(f"{cdn}/slow.png"))
    assert response.status_code == 422
    assert "fetch timed out after 0.3 s" in response.json()["detail"]
