"""Turning a request's images into RGB PIL images, within the limits in settings.

Inline images are base64; URL images are fetched by `app.service.fetch` (allowlist, public
addresses only, no redirects, timeouts, a cap on the bytes read).
"""

import asyncio
import base64
import binascii
import io
import time

from PIL import Image

from app.model.images import ImageDecodeError, decode_rgb
from app.service.errors import BadPostError
from app.service.fetch import FetchError, UrlFetcher
from app.service.settings import Settings


class ImageLoader:
    """Decodes and fetches images for one service; shares one HTTP client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._fetcher = UrlFetcher(settings)

    async def aclose(self) -> None:
        await self._fetcher.aclose()

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
        """Decode to RGB within the byte and pixel limits; problems are 422s naming the field."""
        if len(raw) > self.settings.max_image_bytes:
            raise BadPostError(post_id, field, "image larger than the byte limit")
        try:
            return decode_rgb(io.BytesIO(raw), self.settings.max_image_pixels)
        except ImageDecodeError as exc:
            raise BadPostError(post_id, field, exc.problem) from None

    async def fetch(self, post_id: str, field: str, url: str, deadline: float) -> Image.Image:
        """Fetch an image from an allowlisted host before `deadline` (`time.monotonic()`);
        errors cost this post only."""
        try:
            raw = await self._fetcher.fetch(url, deadline - time.monotonic())
        except FetchError as exc:
            raise BadPostError(post_id, field, str(exc)) from None
        # Decoding is CPU work: keep it off the event loop.
        return await asyncio.to_thread(self.decode_bytes, post_id, field, raw)
