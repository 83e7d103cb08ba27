"""Decoding bounded in formats, memory and time (issue 13, item 3).

- Only the documented formats (JPEG, PNG, WebP, GIF) are opened: an ICO whose directory says
  16 x 16 but which holds a large PNG was decoded whole inside `Image.open`.
- A bounded mutation fuzz over seed images of every accepted format: no 5xx, ever.
- A request's images share one budget of decoded pixels, checked from each header before
  its pixels are read, and no image is decoded after the request's deadline.
"""

import base64
import io
import random
import resource
import struct
import time

import pytest
from PIL import Image

from app.model.backbones.dual_encoder import letterbox
from app.service.errors import ImagesBusyError
from app.service.images import ImageLoader, PixelBudget, SharedPixels
from app.service.settings import Settings
from tests.service.conftest import post


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _with_images(post_id: str, *raws: bytes) -> dict:
    return {"post_id": post_id, "images": [{"data": _b64(raw)} for raw in raws]}


def _ico_hiding(png: bytes) -> bytes:
    """An ICO whose directory entry says 16 x 16 but whose image data is `png`."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def _seeds() -> dict[str, bytes]:
    rng = random.Random(0)  # noqa: S311 - test data, not secrets
    pixels = bytes(rng.randrange(256) for _ in range(48 * 40 * 3))
    image = Image.frombytes("RGB", (48, 40), pixels)
    frames = [image, image.rotate(90, expand=False)]
    return {
        "JPEG": _encode(image, "JPEG", quality=80),
        "PNG": _encode(image, "PNG"),
        "WEBP": _encode(image, "WEBP", quality=80),
        "GIF": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "PNG-P": _encode(image.convert("P"), "PNG"),
    }


def _mutants(seed: bytes, rng: random.Random, count: int) -> list[bytes]:
    """Byte flips, truncations, inserted and duplicated spans: the usual mutation fuzz."""
    out = []
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(4)
            at = rng.randrange(len(data))
            if kind == 0:
                data[at] = rng.randrange(256)
            elif kind == 1:
                del data[at:]
                if not data:
                    data = bytearray(seed[:1])
            elif kind == 2:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            else:
                span = data[at : at + rng.randint(1, 64)]
                data[at:at] = span * rng.randint(1, 8)
        out.append(bytes(data))
    return out


async def test_only_documented_formats_are_opened(running) -> None:
    small = Image.new("RGB", (32, 32), (10, 200, 30))
    big_png = _encode(Image.new("1", (9000, 9000)), "PNG")  # 81 M pixels, ~10 KB
    others = {
        "ICO hiding a 9000x9000 PNG": _ico_hiding(big_png),
        "ICO": _encode(small, "ICO"),
        "BMP": _encode(small, "BMP"),
        "TIFF": _encode(small, "TIFF"),
        "PPM": _encode(small, "PPM"),
        "TGA": _encode(small, "TGA"),
    }
    async with running(max_image_pixels=100_000_000) as (client, _):
        accepted = {
            name: await client.post("/route", json=_with_images("ok", raw))
            for name, raw in _seeds().items()
        }
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        refused = {
            name: await client.post("/route", json=_with_images("x", raw))
            for name, raw in others.items()
        }
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, response in accepted.items():
        assert response.status_code == 200, (name, response.text)
    for name, response in refused.items():
        assert response.status_code == 422, (name, response.text)
        assert response.json()["detail"] == "post 'x', images[0].data: not an image", name
    # The hidden PNG was never decoded (81 MB as mode "1", 243 MB as RGB).
    assert (peak_after - peak_before) * 1024 < 40 * 2**20


async def test_mutated_images_of_every_format_never_fail_the_server(running) -> None:
    rng = random.Random(13)  # noqa: S311 - test data, not secrets
    mutants = [(name, m) for name, seed in _seeds().items() for m in _mutants(seed, rng, 60)]
    statuses: dict[int, int] = {}
    async with running() as (client, _):
        for name, raw in mutants:
            response = await client.post("/route", json=_with_images("f", raw))
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code in (200, 422), (name, response.status_code, response.text)
            if response.status_code == 422:
                assert response.json()["error"] == "bad_post", response.text
        after = await client.post("/route", json=post("still-fine"))
    assert after.status_code == 200
    # The fuzz did reach both outcomes: some mutants still decode, most do not.
    assert statuses.get(200, 0) > 0 and statuses.get(422, 0) > 0, statuses


async def test_a_request_shares_one_budget_of_decoded_pixels(running) -> None:
    large = _encode(Image.new("RGB", (5000, 5000), (9, 9, 9)), "PNG")  # 25 M pixels, ~70 KB
    settings = {
        "max_images_per_post": 16,
        "max_image_pixels": 25_000_000,
        "max_request_pixels": 60_000_000,
        "deadline_ms": 60_000,
    }
    async with running(**settings) as (client, state):
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        over = await client.post("/route", json=_with_images("big", *[large] * 16))
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        two = await client.post("/route", json=_with_images("two", large, large))
        batch = await client.post(
            "/route/batch",
            json={"posts": [_with_images("a", large, large), _with_images("b", large)]},
        )
        rejected = state.metrics.rejected.labels("too_many_pixels")._value.get()
    assert over.status_code == 413, over.text
    assert over.json()["error"] == "too_many_pixels"
    assert "budget of 60000000 decoded pixels" in over.json()["detail"]
    # At most the budget was decoded (60 M pixels, 180 MB as RGB), not 16 x 25 M (1.2 GB).
    assert (peak_after - peak_before) * 1024 < 400 * 2**20
    assert two.status_code == 200, two.text
    # The budget is per request, over every post of a batch.
    assert batch.status_code == 413 and batch.json()["error"] == "too_many_pixels"
    assert rejected == 2


async def test_no_image_is_decoded_after_the_deadline(running) -> None:
    large = _encode(Image.new("RGB", (5000, 5000), (9, 9, 9)), "PNG")
    started = time.perf_counter()
    Image.open(io.BytesIO(large)).convert("RGB")
    one_decode = time.perf_counter() - started
    settings = {
        "max_images_per_post": 32,
        "max_image_pixels": 25_000_000,
        "max_request_pixels": 10**9,
        "decode_threads": 1,
        "deadline_ms": max(one_decode * 1000, 50),
    }
    async with running(**settings) as (client, state):
        started = time.perf_counter()
        response = await client.post("/route", json=_with_images("slow", *[large] * 32))
        elapsed = time.perf_counter() - started
        deadline_rejections = state.metrics.rejected.labels("deadline")._value.get()
    assert response.status_code == 504, response.text
    assert deadline_rejections == 1
    # Decoding all 32 on one thread takes ~32 decodes; it stopped after a few.
    assert elapsed < 12 * one_decode, (elapsed, one_decode)


def test_images_are_fitted_for_the_model_as_they_are_decoded() -> None:
    """With the model's `fit_image` (the dual encoder's letterbox), a large upload leaves
    the decode pool small: not resized later on the batch's preparing thread, nor held whole."""
    loader = ImageLoader(Settings())
    raw = _encode(Image.new("RGB", (3000, 2000), (9, 99, 199)), "PNG")
    assert loader.decode_bytes("p", "images[0]", raw).size == (3000, 2000)
    loader.fit_for_model(lambda image: letterbox(image, 224))
    fitted = loader.decode_bytes("p", "images[0]", raw)
    assert fitted.size == (224, 224) and fitted.mode == "RGB"


def test_requests_in_progress_share_one_ceiling_of_decoded_pixels() -> None:
    shared = SharedPixels(60_000_000, retry_after_s=1)
    first = PixelBudget(100_000_000, time.monotonic() + 60, shared)
    second = PixelBudget(100_000_000, time.monotonic() + 60, shared)
    first.spend("a", "images[0]", 5000, 5000)
    first.spend("a", "images[1]", 5000, 5000)
    with pytest.raises(ImagesBusyError, match="RADAR_MAX_INFLIGHT_PIXELS"):
        second.spend("b", "images[0]", 5000, 5000)  # 75 M would be held
    assert shared.held == 50_000_000
    first.release()  # answered: its images are let go
    second.spend("b", "images[0]", 5000, 5000)
    assert shared.held == 25_000_000
    second.release()
    assert shared.held == 0


async def test_every_request_gives_its_pixels_back(running) -> None:
    large = _encode(Image.new("RGB", (3000, 3000), (9, 9, 9)), "PNG")
    async with running(max_images_per_post=8, max_request_pixels=40_000_000) as (client, state):
        answered = await client.post("/route", json=_with_images("ok", large, large))
        over = await client.post("/route", json=_with_images("big", *[large] * 6))
        broken = await client.post("/route", json=_with_images("bad", large, b"not an image"))
        held = state.images.shared_pixels.held
    assert (answered.status_code, over.status_code, broken.status_code) == (200, 413, 422)
    assert held == 0
