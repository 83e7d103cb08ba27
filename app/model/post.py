"""The model-side view of a post: what every backbone's input builder consumes."""

from dataclasses import dataclass, field

from PIL import Image

from app.model.text_normalize import normalize_text


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
        """The post's text as every backbone reads it: title, then OCR text, one per line.

        Each part goes through `normalize_text` (NFKC, look-alike letters folded, invisible and
        control characters out) here, in the one builder serving and training share, so that
        both see the text as a reader does: `frее` spelled with a Cyrillic `е` reads `free`. A
        part left empty by that (a title of zero-width spaces) is left out like an empty one.
        """
        title, ocr_text = normalize_text(self.title), normalize_text(self.ocr_text)
        parts = []
        if title:
            parts.append(f"Title: {title}")
        if ocr_text:
            parts.append(f"OCR: {ocr_text}")
        return "\n".join(parts)
