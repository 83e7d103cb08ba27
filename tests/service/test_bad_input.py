"""Hostile and broken requests: each answered 4xx in the documented format, never a 5xx.

Extends `test_route.py` (which has the first invalid-request, image and limit cases). Cases
that share settings run against one app start, each failure naming its case.
"""

import base64
import io
import resource
import struct
import zlib

import pytest
from PIL import Image

from tests.service.conftest import png_b64, post

JSON = {"content-type": "application/json"}


def loc_of(response) -> list:
    return response.json()["detail"][0]["loc"]


BAD_BODIES = [
    (b"{bad", ["body", 1]),
    (b'{"post_id": "x"} trailing', ["body", 17]),
    (b"", ["body"]),  # no body at all: the post is missing
    (b"[]", ["body"]),
    (b"null", ["body"]),
    (b'"a string"', ["body"]),
    (b'{"post_id": "x", "title": NaN}', ["body", "title"]),
    (b'{"post_id": "\xff\xfe"}', ["body"]),  # not UTF-8
    (b'{"post_id": "\xe9t\xe9"}', ["body"]),  # Latin-1 bytes, not UTF-8
    (b"[" * 100_000, ["body"]),  # nested past the parser's recursion limit
]


async def test_bodies_that_are_not_a_json_post_are_422(running) -> None:
    async with running() as (client, _):
        for raw, loc in BAD_BODIES:
            response = await client.post("/route", content=raw, headers=JSON)
            assert response.status_code == 422, (raw[:40], response.text)
            assert response.json()["error"] == "invalid_request", raw[:40]
            assert loc_of(response)[: len(loc)] == loc, (raw[:40], response.text)


async def test_wrong_types_and_unknown_fields_are_422_naming_the_field(running) -> None:
    image = {"data": png_b64()}
    cases = [
        ("/route", {"post_id": "x", "title": 5}, ["body", "title"]),
        ("/route", {"post_id": "x", "ocr_text": ["a"]}, ["body", "ocr_text"]),
        ("/route", {"post_id": "x", "images": {"data": "x"}}, ["body", "images"]),
        ("/route", {"post_id": "x", "images": [5]}, ["body", "images", 0]),
        ("/route", {"post_id": "x", "images": [{"data": 123}]}, ["body", "images", 0, "data"]),
        ("/route", {"post_id": ["x"]}, ["body", "post_id"]),
        ("/route", {"title": "no id"}, ["body", "post_id"]),
        # Unknown fields at every level are refused, so a typo never drops data silently.
        ("/route", {"post_id": "x", "images": [{**image, "alt": "a"}]}, ["body", "images", 0]),
        ("/route/batch", {"posts": [post("a")], "dry_run": True}, ["body", "dry_run"]),
        ("/route/batch", {"posts": "a"}, ["body", "posts"]),
        ("/route/batch", {"posts": []}, ["body", "posts"]),
        ("/route/batch", {"post": [post("a")]}, ["body", "posts"]),
    ]
    async with running() as (client, _):
        for path, body, loc in cases:
            response = await client.post(path, json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"] == "invalid_request", body
            assert loc_of(response)[: len(loc)] == loc, (body, response.text)


async def test_post_id_text_and_image_count_limits(running, tiny_store) -> None:
    limits = {"max_text_chars": 2000, "max_images_per_post": 2}
    async with running(**limits) as (client, _):
        longest_id = await client.post("/route", json=post("i" * 256))
        too_long_id = await client.post("/route", json=post("i" * 257))
        at_limit = await client.post("/route", json=post("t", title="word " * 400))
        # Far past the model's token budget, still within the character limit: the
        # tokenizer truncates, so text past the budget does not change the scores.
        longer = await client.post("/route", json=post("t", title="word " * 390 + "x" * 50))
        title = await client.post("/route", json=post("t", title="x" * 2001))
        ocr = await client.post("/route/batch", json={"posts": [post("o", ocr="y" * 2001)]})
        images = await client.post("/route", json=post("m", images=3))
    assert longest_id.status_code == 200
    assert too_long_id.status_code == 422 and loc_of(too_long_id) == ["body", "post_id"]
    assert at_limit.status_code == 200 and longer.status_code == 200
    assert at_limit.json()["scores"] == pytest.approx(longer.json()["scores"], abs=1e-6)
    for response, where in ((title, "'t', title"), (ocr, "'o', ocr_text")):
        assert response.status_code == 422, response.text
        assert response.json() == {
            "error": "bad_post",
            "detail": f"post {where}: longer than 2000 chars",
        }
    assert images.status_code == 422
    assert images.json()["detail"] == "post 'm', images: 3 images, at most 2 allowed"


async def test_lone_surrogates_are_422_not_a_failed_batch(running) -> None:
    # Valid JSON escapes that are not encodable text: the tokenizer would fail the whole
    # model batch (every co-batched post would fall back), and echoing an id would 500.
    cases = [
        b'{"post_id": "p", "title": "\\udc80"}',
        b'{"post_id": "p", "ocr_text": "a\\ud800b"}',
        b'{"post_id": "\\udfff"}',
        b'{"post_id": "p", "images": [{"url": "https://cdn.example/\\udc80"}]}',
        b'{"post_id": "p", "\\udc80": 1}',  # an unknown field named by a lone surrogate
    ]
    async with running() as (client, _):
        for raw in cases:
            response = await client.post("/route", content=raw, headers=JSON)
            assert response.status_code == 422, (raw, response.text)
            assert response.json()["error"] == "invalid_request"
        nul = await client.post("/route", json=post("nul", title="a\x00b", ocr="\u202e\ufeff"))
    assert nul.status_code == 200 and nul.json()["flags"] == []


async def test_duplicate_ids_are_named(running) -> None:
    async with running() as (client, _):
        response = await client.post(
            "/route/batch", json={"posts": [post("a"), post("b"), post("a")]}
        )
    assert response.status_code == 422
    assert "post_id repeated in the batch: ['a']" in response.json()["detail"][0]["msg"]


async def test_chunked_body_over_the_limit_is_413_before_it_is_read_whole(running) -> None:
    sent = {"chunks": 0}

    async def endless():  # no Content-Length: only counting the stream can stop it
        while sent["chunks"] < 10_000:
            sent["chunks"] += 1
            yield b" " * 1024

    async with running(max_body_bytes=8 * 1024) as (client, _):
        response = await client.post("/route", content=endless(), headers=JSON)
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "body_too_large"
    assert sent["chunks"] <= 10  # stopped right after the limit, not at 10 MB
    assert 'radar_rejected_total{reason="body_too_large"} 1.0' in metrics


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_bomb(side: int) -> bytes:
    """A 1-bit PNG of `side`² pixels of zeros: ~side²/8 bytes deflated to a few hundred KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" * (1 + side // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def post_with(post_id: str, image: bytes) -> dict:
    return {"post_id": post_id, "images": [{"data": _b64(image)}]}


async def test_broken_and_hostile_images_are_422_naming_the_field(running) -> None:
    jpeg = _jpeg()
    cases = [
        ("aGVsbG8", "not valid base64"),  # padding missing
        ("aGVs\nbG8=", "not valid base64"),  # line breaks are not base64
        ("data:image/png;base64," + png_b64(), "not valid base64"),  # a data URL, not base64
        (_b64(b"%PDF-1.7\n%\xe2\xe3"), "not an image"),
        (_b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>'), "not an image"),
        (_b64(b""), "not an image"),
        (_b64(jpeg[: len(jpeg) // 2]), "broken image"),  # truncated JPEG
        (_b64(base64.b64decode(png_b64(64, 64))[:-40]), "broken image"),  # truncated PNG
    ]
    async with running() as (client, _):
        for data, problem in cases:
            body = {"post_id": "img", "images": [{"data": png_b64()}, {"data": data}]}
            response = await client.post("/route", json=body)
            assert response.status_code == 422, (problem, response.text)
            assert response.json() == {
                "error": "bad_post",
                "detail": f"post 'img', images[1].data: {problem}",
            }, data[:40]
        whole = await client.post("/route", json=post_with("ok", jpeg))
    assert whole.status_code == 200


async def test_decompression_bombs_are_refused_from_the_header_memory_stays_low(running) -> None:
    ours = _png_bomb(8_000)  # 64 M pixels, over our limit, under Pillow's own
    theirs = _png_bomb(30_000)  # 900 M pixels: ~900 MB decoded as mode "1", 2.7 GB as RGB
    assert len(theirs) < 1_000_000
    async with running(max_image_pixels=25_000_000) as (client, _):
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        by_us = await client.post("/route", json=post_with("b", ours))
        # Past Pillow's limit Pillow refuses at open; that is a 422 as well.
        by_pillow = await client.post("/route", json=post_with("b", theirs))
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert by_us.status_code == 422 and by_pillow.status_code == 422
    assert by_us.json()["detail"] == "post 'b', images[0].data: 8000x8000 pixels exceeds the limit"
    assert by_pillow.json()["detail"] == "post 'b', images[0].data: image exceeds the pixel limit"
    # Neither was decoded: the peak RSS barely moved (ru_maxrss is in KiB on Linux).
    assert (peak_after - peak_before) * 1024 < 40 * 2**20
