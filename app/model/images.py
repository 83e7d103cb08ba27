"""Decoding one image file to RGB, the same way for serving (uploads) and training (disk)."""

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from app.model.errors import InputError


class ImageDecodeError(InputError):
    """An image that cannot be used; `problem` is a short reason, `detail` Pillow's words."""

    def __init__(self, problem: str, detail: str = "", *, over_limit: bool = False) -> None:
        self.problem = problem
        self.detail = detail
        self.over_limit = over_limit  # too many pixels, as opposed to unreadable
        super().__init__(f"{problem}: {detail}" if detail else problem)


# The formats the API documents. Pillow would otherwise try every plugin it has, and some
# decode inside `Image.open` (an ICO whose directory says 16 x 16 holds a 9000 x 9000 PNG, all
# decoded before the pixel check) or fail in ways no caller can act on (corrupt AVIF, DDS,
# BLP, SPIDER files raised RuntimeError, NotImplementedError, AttributeError). These four read
# only their header in `Image.open`, so the pixel checks come before any pixel is decoded.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


def decode_rgb(
    source: BinaryIO | Path,
    max_pixels: int | None = None,
    *,
    before_decode: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Open (an accepted format only), check the pixel count from the header, then decode.

    Pillow's decompression-bomb warning counts as an error, and `max_pixels` (when given) is
    checked before decoding, so a huge image is refused without being decoded. So is
    `before_decode(width, height)`, called between the header and the pixels: what it
    raises (a request's pixel budget spent, its deadline passed) propagates unchanged.

    Any failure of Pillow's decoders is an `ImageDecodeError`: a plugin may raise any
    exception type on a corrupt file, and one bad upload must cost its post only.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(source)
        with image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"{width}x{height} pixels exceeds the limit", over_limit=True
                )
            if before_decode is not None:
                before_decode(width, height)
            return _load_rgb(image)


def _open(source: BinaryIO | Path) -> Image.Image:
    try:
        return Image.open(source, formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("image exceeds the pixel limit", over_limit=True) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image", "accepted: JPEG, PNG, WebP, GIF") from None
    except Exception as exc:
        raise ImageDecodeError("broken image", _describe(exc)) from None


def _load_rgb(image: Image.Image) -> Image.Image:
    try:
        image.load()
        return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("image exceeds the pixel limit", over_limit=True) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise ImageDecodeError("broken image", _describe(exc)) from None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]
