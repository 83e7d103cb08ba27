"""Decoding one image file to RGB, the same way for serving (uploads) and training (disk)."""

import warnings
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


def decode_rgb(source: BinaryIO | Path, max_pixels: int | None = None) -> Image.Image:
    """Open, check the pixel count from the header, then decode fully to RGB.

    Pillow's decompression-bomb warning counts as an error, and `max_pixels` (when given) is
    checked before decoding, so a huge image is refused without being decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size  # Image.open reads only the header
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageDecodeError(
                        f"{width}x{height} pixels exceeds the limit", over_limit=True
                    )
                image.load()
                return image.convert("RGB")
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("image exceeds the pixel limit", over_limit=True) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("broken image", str(exc)) from None
