"""From a request's post to the model's `Post`: limits checked, images decoded off the loop."""

import asyncio

from PIL import Image

from app.model.post import Post
from app.service.errors import BadPostError
from app.service.images import ImageLoader, PixelBudget
from app.service.schemas import ImageIn, PostIn
from app.service.settings import Settings


async def to_model_post(
    post: PostIn, loader: ImageLoader, settings: Settings, budget: PixelBudget
) -> Post:
    """Check the post against the limits and decode its images; `BadPostError` names the field.

    `budget` is the request's: its decoded pixels and its deadline (URL images must arrive
    before it, and no image is decoded after it).
    """
    for name in ("title", "ocr_text"):
        if len(getattr(post, name)) > settings.max_text_chars:
            raise BadPostError(post.post_id, name, f"longer than {settings.max_text_chars} chars")
    if len(post.images) > settings.max_images_per_post:
        raise BadPostError(
            post.post_id,
            "images",
            f"{len(post.images)} images, at most {settings.max_images_per_post} allowed",
        )
    images = await asyncio.gather(
        *(
            _load(post.post_id, f"images[{i}]", image, loader, budget)
            for i, image in enumerate(post.images)
        )
    )
    return Post(title=post.title, ocr_text=post.ocr_text, images=tuple(images))


async def _load(
    post_id: str, field: str, image: ImageIn, loader: ImageLoader, budget: PixelBudget
) -> Image.Image:
    if image.data is not None:
        return await loader.decode_inline(post_id, f"{field}.data", image.data, budget)
    if image.url is None:  # the schema guarantees one of the two; be explicit anyway
        raise BadPostError(post_id, field, "neither url nor data")
    return await loader.fetch(post_id, f"{field}.url", image.url, budget)
