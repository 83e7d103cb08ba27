"""Fetching image URLs without becoming an SSRF proxy.

Only hosts on the allowlist; the host is resolved once, every address it resolves to must be
public (unless `RADAR_URL_ALLOW_PRIVATE_NETWORKS` says otherwise, for tests and private CDNs),
and the connection goes to the checked address: the hostname travels only in `Host` and TLS
SNI, so a DNS answer that changes between check and connect (DNS rebinding) changes nothing.
Redirects are never followed, compressed responses are refused (never inflated), the raw
bytes read are capped, and the whole fetch (DNS included) has one time budget, so a slow
host costs its post an error in time, never the request.
"""

import asyncio
import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

import httpx

from app.service.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 6052 NAT64 prefix: an address in it reaches the IPv4 address in its last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class FetchError(Exception):
    """The URL cannot or may not be fetched; the message is safe to show to the caller."""


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast, looking through IPv6 forms that embed an IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public(embedded):
            return False
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (a literal resolves to itself)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # sockaddr[0] of an IPv6 answer may carry a zone ("fe80::1%eth0"): keep the address only.
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


class UrlFetcher:
    """Downloads image bytes from allowlisted hosts; one shared HTTP client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.allowlist = {host.lower() for host in settings.url_allowlist}
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def fetch(self, url: str, budget_s: float) -> bytes:
        """The body of `url`, within `budget_s` seconds; `FetchError` says why not."""
        parts = self._checked_url(url)
        budget_s = min(budget_s, self.settings.url_fetch_timeout_s)
        if budget_s <= 0:
            raise FetchError("no time left before the request's deadline")
        try:
            async with asyncio.timeout(budget_s):
                address = await self._public_address(parts)
                return await self._download(parts, address)
        except TimeoutError:
            raise FetchError(f"fetch timed out after {budget_s:.2g} s") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"fetch failed: {exc}") from None

    def _checked_url(self, url: str) -> SplitResult:
        if not self.allowlist:
            raise FetchError("image URLs are disabled (empty allowlist)")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError for a port out of range)
        except ValueError:
            raise FetchError("not a valid URL") from None
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or host not in self.allowlist:
            raise FetchError(f"host {host!r} is not on the allowlist")
        return parts

    async def _public_address(self, parts: SplitResult) -> IPAddress:
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = await resolve(host, port)
        except (OSError, UnicodeError, ValueError):
            raise FetchError(f"host {host!r} does not resolve") from None
        if not addresses:
            raise FetchError(f"host {host!r} does not resolve")
        # Every answer must pass, not just the first: a resolver's order is not ours to pick.
        if not self.settings.url_allow_private_networks and not all(map(is_public, addresses)):
            raise FetchError(f"host {host!r} resolves to a private or reserved address")
        return addresses[0]

    async def _download(self, parts: SplitResult, address: IPAddress) -> bytes:
        host = parts.hostname or ""
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = literal if parts.port is None else f"{literal}:{parts.port}"
        pinned = parts._replace(netloc=netloc).geturl()
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        limit = self.settings.max_image_bytes
        request = self._get_client().build_request(
            "GET",
            pinned,
            # Image files are compressed already; a compressed response would be inflated by
            # httpx on the event loop, past the byte cap (1.8 KB sent as `gzip, gzip` became
            # 1 GiB). Ask for the bytes as they are, and refuse any other answer below.
            headers={"Host": host_header, "Accept-Encoding": "identity"},
            # TLS: SNI and certificate check against the hostname, not the pinned address.
            extensions={"sni_hostname": host} if parts.scheme == "https" else {},
        )
        response = await self._get_client().send(request, stream=True)
        try:
            if response.status_code != 200:
                # Redirects (3xx) land here too: they are never followed.
                raise FetchError(f"fetch failed: HTTP status {response.status_code}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise FetchError(f"compressed response refused (Content-Encoding: {encoding})")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise FetchError("image larger than the byte limit")
            chunks, size = [], 0
            # Raw bytes: what came over the wire is what is counted and kept.
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > limit:  # stop reading: never hold more than the limit
                    raise FetchError("image larger than the byte limit")
                chunks.append(chunk)
        finally:
            await response.aclose()
        return b"".join(chunks)

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = httpx.Timeout(
                self.settings.url_read_timeout_s, connect=self.settings.url_connect_timeout_s
            )
            # No redirects: a redirect could lead off the allowlist. No proxies from the
            # environment either: the address check must be about the host we connect to.
            self._client = httpx.AsyncClient(
                timeout=timeout, follow_redirects=False, trust_env=False
            )
        return self._client
