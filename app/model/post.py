"""The model-side view of a post: what every backbone's input builder consumes."""

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class Post:
    """One post, already decoded: RGB images in upload order, the title and the OCR text.

    Serving builds it from a request, training from a JSONL line; both then hand it to the
    same `Backbone.build_inputs`, so the model sees identical inputs in both places.
    """

    title: str = ""
    ocr_text: str = ""
    images: tuple[Image.Image, ...] = field(default_factory=tuple)

    def text(self) -> str:
        """The post's text as every backbone reads it: title, then OCR text."""
        parts = []
        if self.title:
            parts.append(f"Title: {self.title}")
        if self.ocr_text:
            parts.append(f"OCR: {self.ocr_text}")
        return "\n".join(parts)
