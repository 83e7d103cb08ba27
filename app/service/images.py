"""Turning a request's images into RGB PIL images, within the limits in settings.

Inline images are base64; URL images are fetched by `app.service.fetch` (allowlist, public
addresses only, no redirects, timeouts, a cap on the bytes read).
"""

import asyncio
import base64
import binascii
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from PIL import Image

from app.model.images import ImageDecodeError, decode_rgb
from app.service.errors import (
    BadPostError,
    DeadlineExceededError,
    ImagesBusyError,
    TooManyPixelsError,
)
from app.service.fetch import FetchError, UrlFetcher
from app.service.settings import Settings


class PixelBudget:
    """What one request may still decode: pixels (`RADAR_MAX_REQUEST_PIXELS`) and time.

    Checked between each image's header and its pixels, so a request of many large images
    (48 valid 5000 x 5000 PNGs, 84 KB each on the wire, ~5 GB decoded) stops at the image
    that would pass the budget or the deadline, not after decoding them all. Spent from the
    decode threads, hence the lock.
    """

    def __init__(self, pixels: int, deadline: float, shared: "SharedPixels") -> None:
        self.pixels = pixels
        self.left = pixels
        self.deadline = deadline  # time.monotonic()
        self.shared = shared
        self.closed = False
        self._lock = threading.Lock()

    def spend(self, post_id: str, field: str, width: int, height: int) -> None:
        if time.monotonic() >= self.deadline:
            raise DeadlineExceededError(f"deadline passed before decoding post {post_id!r}")
        with self._lock:
            if self.closed:  # the request has been answered (another image failed): stop
                raise DeadlineExceededError(f"request of post {post_id!r} already answered")
            if width * height > self.left:
                raise TooManyPixelsError(
                    f"post {post_id!r}, {field}: {width}x{height} pixels would pass the "
                    f"request's budget of {self.pixels} decoded pixels (RADAR_MAX_REQUEST_PIXELS); "
                    "send fewer or smaller images per request"
                )
            self.shared.take(width * height)
            self.left -= width * height

    def release(self) -> None:
        """The request is done with its images (answered or refused): give its pixels back.

        Images of the request still decoding on the pool (one of its images failed and the
        answer left) spend nothing afterwards: they stop at `spend`, so nothing leaks."""
        with self._lock:
            self.closed = True
            self.shared.give(self.pixels - self.left)
            self.left = self.pixels


class SharedPixels:
    """Decoded pixels held by all requests in progress, at most `RADAR_MAX_INFLIGHT_PIXELS`.

    The per-request budget bounds one request; this bounds their sum (4 concurrent requests
    of 100 M pixels each took RSS from 0.45 to 1.5 GB). A request that would pass it is a
    503 with Retry-After: the service is busy with images, not the request wrong.
    """

    def __init__(self, pixels: int, retry_after_s: int) -> None:
        self.pixels = pixels
        self.held = 0
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()

    def take(self, pixels: int) -> None:
        with self._lock:
            if self.held + pixels > self.pixels:
                raise ImagesBusyError(
                    f"the service holds {self.held} decoded pixels of other requests "
                    f"(RADAR_MAX_INFLIGHT_PIXELS {self.pixels}); retry",
                    self.retry_after_s,
                )
            self.held += pixels

    def give(self, pixels: int) -> None:
        with self._lock:
            self.held -= pixels


class ImageLoader:
    """Decodes and fetches images for one service; shares one HTTP client.

    Decoding runs on a pool of its own (`RADAR_DECODE_THREADS`), not the default executor:
    a burst of large images must not delay `/feedback` or the thresholds reload, which use
    the default one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._fetcher = UrlFetcher(settings)
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.shared_pixels = SharedPixels(settings.max_inflight_pixels, settings.retry_after_s)
        # Applied to each image right after its decode, on the decode pool: the model's
        # `fit_image` once it is loaded (`fit_for_model`), so that resizing a large upload is
        # this request's work, within its deadline, not its batch's on the preparing thread.
        self._fit: Callable[[Image.Image], Image.Image] = _as_decoded

    def fit_for_model(self, fit: Callable[[Image.Image], Image.Image]) -> None:
        self._fit = fit

    async def aclose(self) -> None:
        await self._fetcher.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def budget(self, deadline: float) -> PixelBudget:
        """A fresh pixel budget for one request that ends at `deadline`."""
        return PixelBudget(self.settings.max_request_pixels, deadline, self.shared_pixels)

    async def decode_inline(
        self, post_id: str, field: str, data: str, budget: PixelBudget
    ) -> Image.Image:
        """`decode_base64` on the decode pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, self.decode_base64, post_id, field, data, budget
        )

    def decode_base64(
        self, post_id: str, field: str, data: str, budget: PixelBudget | None = None
    ) -> Image.Image:
        """Decode one inline image; any problem is a 422 naming the post and field."""
        # base64 inflates by 4/3: refuse before decoding what would exceed the byte limit.
        if len(data) > self.settings.max_image_bytes * 4 // 3 + 4:
            raise BadPostError(post_id, field, "image larger than the byte limit")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadPostError(post_id, field, "not valid base64") from None
        return self.decode_bytes(post_id, field, raw, budget)

    def decode_bytes(
        self, post_id: str, field: str, raw: bytes, budget: PixelBudget | None = None
    ) -> Image.Image:
        """Decode to RGB within the byte and pixel limits (and `budget`, when given);
        problems are 422s naming the field."""
        if len(raw) > self.settings.max_image_bytes:
            raise BadPostError(post_id, field, "image larger than the byte limit")
        spend = None if budget is None else partial(budget.spend, post_id, field)
        try:
            image = decode_rgb(io.BytesIO(raw), self.settings.max_image_pixels, before_decode=spend)
        except ImageDecodeError as exc:
            raise BadPostError(post_id, field, exc.problem) from None
        return self._fit(image)

    async def fetch(self, post_id: str, field: str, url: str, budget: PixelBudget) -> Image.Image:
        """Fetch an image from an allowlisted host before the budget's deadline, then decode
        it on the decode pool; errors cost this post only."""
        try:
            raw = await self._fetcher.fetch(url, budget.deadline - time.monotonic())
        except FetchError as exc:
            raise BadPostError(post_id, field, str(exc)) from None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, self.decode_bytes, post_id, field, raw, budget
        )


def _as_decoded(image: Image.Image) -> Image.Image:
    return image
