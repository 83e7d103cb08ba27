"""Turning a request's images into RGB PIL images, within the limits in settings.

Inline images are base64; URL images are fetched with httpx only from allowlisted hosts,
without following redirects, with timeouts and a cap on the bytes read.
"""

import base64
import binascii
import io
import warnings
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from app.service.errors import BadPostError
from app.service.settings import Settings


class _TooLarge(Exception):
    pass


class ImageLoader:
    """Decodes and fetches images for one service; shares one HTTP client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.allowlist = {host.lower() for host in settings.url_allowlist}
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def decode_base64(self, post_id: str, field: str, data: str) -> Image.Image:
        """Decode one inline image; any problem is a 422 naming the post and field."""
        # base64 inflates by 4/3: refuse before decoding what would exceed the byte limit.
        if len(data) > self.settings.max_image_bytes * 4 // 3 + 4:
            raise BadPostError(post_id, field, "image larger than the byte limit")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadPostError(post_id, field, "not valid base64") from None
        return self.decode_bytes(post_id, field, raw)

    def decode_bytes(self, post_id: str, field: str, raw: bytes) -> Image.Image:
        """Open, check the pixel count from the header, then decode fully to RGB."""
        if len(raw) > self.settings.max_image_bytes:
            raise BadPostError(post_id, field, "image larger than the byte limit")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(raw))
                # Image.open reads only the header: refuse huge images before decoding them.
                width, height = image.size
                if width * height > self.settings.max_image_pixels:
                    raise BadPostError(post_id, field, f"{width}x{height} pixels exceeds the limit")
                image.load()
                return image.convert("RGB")
        except BadPostError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadPostError(post_id, field, "image exceeds the pixel limit") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            kind = "not an image" if isinstance(exc, UnidentifiedImageError) else "broken image"
            raise BadPostError(post_id, field, kind) from None

    async def fetch(self, post_id: str, field: str, url: str) -> Image.Image:
        """Fetch an image from an allowlisted host; errors cost this post only."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if not self.allowlist:
            raise BadPostError(post_id, field, "image URLs are disabled (empty allowlist)")
        if parts.scheme not in ("http", "https") or host not in self.allowlist:
            raise BadPostError(post_id, field, f"host {host!r} is not on the allowlist")
        try:
            raw = await self._download(url)
        except _TooLarge:
            raise BadPostError(post_id, field, "image larger than the byte limit") from None
        except httpx.HTTPError as exc:
            raise BadPostError(post_id, field, f"fetch failed: {exc}") from None
        return self.decode_bytes(post_id, field, raw)

    async def _download(self, url: str) -> bytes:
        client = self._get_client()
        limit = self.settings.max_image_bytes
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                # Redirects (3xx) land here too: they are never followed.
                raise httpx.HTTPError(f"HTTP status {response.status_code}")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:  # stop reading: never hold more than the limit
                    raise _TooLarge
                chunks.append(chunk)
        return b"".join(chunks)

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = httpx.Timeout(
                self.settings.url_read_timeout_s, connect=self.settings.url_connect_timeout_s
            )
            # No redirects: a redirect could lead off the allowlist.
            self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        return self._client
