"""Request and response bodies of the HTTP API (the contract in DESIGN.md).

Unknown fields are rejected (422): a typo such as `ocr` for `ocr_text` would otherwise route
the post without its text, silently.
"""

import unicodedata
from enum import StrEnum
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _encodable(value: str) -> str:
    """Refuse lone surrogates (JSON `"\\udc80"`): valid JSON, but not UTF-8-encodable text.

    The tokenizer cannot take them, and one such post would fail its whole model batch.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (lone surrogate)") from None
    return value


def _no_control_characters(value: str) -> str:
    """Refuse control characters (NUL, newlines, ANSI escapes, ...) in an identifier.

    An id is a key in the decision log and a label in logs: PostgreSQL refuses a NUL in text
    (one such row would fail the whole flush), and a newline or escape forges log lines.
    """
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ValueError(f"control character U+{ord(bad):04X} in an identifier")
    return value


Text = Annotated[str, AfterValidator(_encodable)]
Identifier = Annotated[
    Text, Field(min_length=1, max_length=256), AfterValidator(_no_control_characters)
]
PostId = Annotated[Identifier, Field(examples=["post-123"])]

# Hard ceilings on every list of a body, checked by pydantic on the list's length before any
# item is validated: a body of 200,000 invalid items costs one check, not 200,000 errors. The
# settings' own limits (`RADAR_MAX_*`, at most these) are checked after validation.
MAX_POSTS_CEILING = 1024
MAX_IMAGES_CEILING = 64
MAX_VERDICTS_CEILING = 100_000
TEXT_LIMITS = (
    "At most `RADAR_MAX_TEXT_CHARS` characters (default 10,000; longer is a 422 `bad_post`). "
    "The model reads title and OCR text up to its own token budget (`max_text_tokens` in "
    "router.json) and truncates the rest."
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageIn(_Body):
    """One image: inline base64 bytes or a URL on an allowlisted host — exactly one."""

    url: Text | None = Field(
        default=None,
        max_length=4096,
        examples=["https://cdn.example/a.jpg"],
        description="http(s) on a host in `RADAR_URL_ALLOWLIST`; never redirected; private, "
        "loopback and link-local addresses refused after DNS resolution",
    )
    data: str | None = Field(
        default=None,
        description="base64 of a JPEG/PNG/WebP/GIF file, at most `RADAR_MAX_IMAGE_BYTES` "
        "decoded and `RADAR_MAX_IMAGE_PIXELS` pixels",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.url is None) == (self.data is None):
            raise ValueError("give exactly one of 'url' or 'data'")
        return self


class PostIn(_Body):
    """One uploaded post. Unknown fields are a 422: a typo must not drop the post's text."""

    post_id: PostId
    title: Text = Field(
        default="", examples=["Limited offer: earn $500/day from home"], description=TEXT_LIMITS
    )
    ocr_text: Text = Field(default="", examples=["DM me on WhatsApp"], description=TEXT_LIMITS)
    images: list[ImageIn] = Field(
        default_factory=list,
        max_length=MAX_IMAGES_CEILING,
        description="at most `RADAR_MAX_IMAGES_PER_POST` (default 4)",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "post_id": "post-123",
                    "title": "Limited offer: earn $500/day from home",
                    "ocr_text": "DM me on WhatsApp",
                    "images": [],
                }
            ]
        },
    )


class BatchIn(_Body):
    """Several posts in one request; post ids must be unique within it."""

    posts: list[PostIn] = Field(
        min_length=1,
        max_length=MAX_POSTS_CEILING,
        description="at most `RADAR_MAX_POSTS_PER_REQUEST` (default 64; more is a 413), "
        "unique `post_id`s (a repeat is a 422)",
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        seen: set[str] = set()
        repeated = {p.post_id for p in self.posts if p.post_id in seen or seen.add(p.post_id)}
        if repeated:
            raise ValueError(f"post_id repeated in the batch: {sorted(repeated)[:5]}")
        return self


class Flag(StrEnum):
    """Anything unusual about a decision."""

    FALLBACK = "fallback"  # the model failed: dispatched to every category, never auto-passed
    AUDIT = "audit"  # sampled for audit: send to the `audit` categories' verticals too


class RouteResult(BaseModel):
    """The router's answer for one post."""

    post_id: str
    scores: dict[str, float] = Field(
        description="p_k per category; empty when the model failed (see flags)",
        examples=[{"lqc": 0.12, "rcs": 0.81, "fe": 0.05}],
    )
    dispatch: list[str] = Field(description="categories sent to their vertical", examples=[["rcs"]])
    auto_pass: bool = Field(description="true when dispatched to no vertical")
    audit: list[str] = Field(
        default_factory=list,
        description="categories the router released but samples for audit: send the post to "
        "these verticals as well (their verdicts measure what the router misses)",
        examples=[["lqc"]],
    )
    thresholds_version: str | None
    model_version: str
    flags: list[Flag] = Field(default_factory=list)


class BatchResult(BaseModel):
    results: list[RouteResult]


class ErrorBody(BaseModel):
    """Every error response: a stable code and a human-readable message."""

    error: str
    detail: str | list[dict[str, object]]
    errors_total: int | None = Field(
        default=None,
        description="invalid_request: how many problems the body had (`detail` lists the first 20)",
    )


class ReadyStatus(BaseModel):
    ready: bool
    reason: str | None = None
    model_version: str | None = None
    thresholds_version: str | None = None


class ReloadOutcome(BaseModel):
    status: str
    thresholds_version: str | None
    reason: str | None = None
    message: str = ""


class VerdictIn(BaseModel):
    """A vertical's verdict on a post the router saw."""

    model_config = ConfigDict(extra="forbid")

    post_id: PostId
    category: Identifier = Field(examples=["spam"])
    violating: bool


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdicts: list[VerdictIn] = Field(
        min_length=1,
        max_length=MAX_VERDICTS_CEILING,
        description="at most RADAR_MAX_VERDICTS_PER_REQUEST",
    )


class FeedbackOutcome(BaseModel):
    accepted: int = Field(description="verdicts stored (committed before this answer)")
    joined: int = Field(description="of those, verdicts on a logged decision")
