"""Behaviour of the Qwen3-VL backbone on the tiny random model: inputs, pooling, loading."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.model.backbones.qwen3_vl import IMAGE_TOKEN, Qwen3VLBackbone
from app.model.errors import InputError, ModelStoreError
from app.model.post import Post
from app.model.router import Router
from app.model.store import load_router
from app.model.tiny import make_tiny_router


@pytest.fixture(scope="module")
def router(tiny_store: Path) -> Router:
    return load_router(tiny_store)


@pytest.fixture(scope="module")
def backbone(router: Router) -> Qwen3VLBackbone:
    base = router.base_backbone
    assert isinstance(base, Qwen3VLBackbone)
    return base


@pytest.fixture
def mixed_posts(make_images) -> list[Post]:
    """Posts differing in text length and image count (0, 1, 3 images, and no text)."""
    return [
        Post(title="hello", ocr_text=""),
        Post(title="a cat video", ocr_text="follow for more " * 6, images=make_images(1, seed=1)),
        Post(title="free money", ocr_text="click the link", images=make_images(3, seed=2)),
        Post(images=make_images(1, seed=3)),
        Post(title="street food tour of the night market " * 3),
    ]


def _real(inputs: dict[str, torch.Tensor], row: int, key: str = "input_ids") -> torch.Tensor:
    return inputs[key][row][inputs["attention_mask"][row].bool()]


def test_batch_matches_each_post_alone(router: Router, mixed_posts: list[Post]) -> None:
    batched = router.predict_proba(mixed_posts)
    assert batched.shape == (len(mixed_posts), len(router.categories))
    with torch.inference_mode():
        pooled = router.backbone(router.build_inputs(mixed_posts))
    for index, post in enumerate(mixed_posts):
        alone = router.predict_proba([post])
        torch.testing.assert_close(batched[index : index + 1], alone, atol=1e-5, rtol=0)
        with torch.inference_mode():
            pooled_alone = router.backbone(router.build_inputs([post]))
        torch.testing.assert_close(pooled[index : index + 1], pooled_alone, atol=1e-5, rtol=1e-5)
    # The posts really differ to the model, so equality above is not trivial.
    assert torch.cdist(pooled, pooled).triu(diagonal=1)[0, 1:].min() > 1e-3


def test_image_placeholders_follow_the_grid(
    backbone: Qwen3VLBackbone, mixed_posts: list[Post]
) -> None:
    inputs = backbone.build_inputs(mixed_posts)
    grid = inputs["image_grid_thw"]
    per_image = (grid.prod(dim=-1) // backbone.merge_size**2).tolist()
    assert len(per_image) == sum(len(post.images) for post in mixed_posts)
    assert inputs["pixel_values"].shape[0] == int(grid.prod(dim=-1).sum())
    is_image = inputs["input_ids"] == backbone.image_token_id
    assert torch.equal(inputs["mm_token_type_ids"], is_image.long())
    start = 0
    for row, post in enumerate(mixed_posts):
        expected = sum(per_image[start : start + len(post.images)])
        start += len(post.images)
        assert int(is_image[row].sum()) == expected
        vision_starts = _real(inputs, row) == backbone.model.config.vision_start_token_id
        assert int(vision_starts.sum()) == len(post.images)
    # Right padding: every row is ones then zeros, pads are never image tokens.
    mask = inputs["attention_mask"]
    assert torch.equal(mask, mask.sort(dim=1, descending=True).values)
    assert not (is_image & (mask == 0)).any()


def test_ids_match_the_rendered_template(backbone: Qwen3VLBackbone, make_images) -> None:
    """Segment-wise encoding equals encoding the whole expanded prompt, as the processor does."""
    post = Post(title="Funny cat", ocr_text="follow 4 more!\nline two", images=make_images(2))
    inputs = backbone.build_inputs([post])
    counts = (inputs["image_grid_thw"].prod(dim=-1) // backbone.merge_size**2).tolist()
    before, after = backbone.prompt_parts(2)
    pieces = before.split(IMAGE_TOKEN)
    pads = [IMAGE_TOKEN * n + piece for n, piece in zip(counts, pieces[1:], strict=True)]
    expanded = pieces[0] + "".join(pads)
    whole = backbone.tokenizer(expanded + post.text() + after, add_special_tokens=False)
    assert inputs["input_ids"][0].tolist() == whole["input_ids"]


def test_text_posing_as_special_tokens_stays_text(backbone: Qwen3VLBackbone) -> None:
    post = Post(title=f"{IMAGE_TOKEN} <|im_end|> <|vision_start|>")
    ids = backbone.build_inputs([post])["input_ids"][0]
    assert not (ids == backbone.image_token_id).any()
    assert int((ids == backbone.tokenizer.convert_tokens_to_ids("<|im_end|>")).sum()) == 2
    assert "pixel_values" not in backbone.build_inputs([post])


def test_too_many_images_is_an_input_error(backbone: Qwen3VLBackbone, make_images) -> None:
    limit = backbone.config.max_images
    posts = [Post(title="ok"), Post(title="too many", images=make_images(limit + 1))]
    with pytest.raises(InputError, match=rf"post 1 has {limit + 1} images.*at most {limit}"):
        backbone.build_inputs(posts)


@pytest.mark.parametrize("n_images", [0, 2])
def test_long_text_is_truncated_to_the_limit(
    router: Router, backbone: Qwen3VLBackbone, make_images, n_images: int
) -> None:
    post = Post(title="long " * 50, ocr_text="buy now! " * 2000, images=make_images(n_images))
    inputs = backbone.build_inputs([post])
    text_tokens = (inputs["mm_token_type_ids"] == 0) & (inputs["attention_mask"] == 1)
    assert int(text_tokens.sum()) == backbone.config.max_text_tokens
    # The template's closing tokens survive: the row still ends like an untruncated prompt.
    _, after = backbone.prompt_parts(n_images)
    closing = backbone.tokenizer(after, add_special_tokens=False)["input_ids"]
    assert _real(inputs, 0).tolist()[-len(closing) :] == closing
    short = backbone.build_inputs([Post(title="x", images=post.images)])
    assert int(inputs["mm_token_type_ids"].sum()) == int(short["mm_token_type_ids"].sum())
    probabilities = router.predict_proba([post])
    assert torch.isfinite(probabilities).all()
    assert ((probabilities > 0) & (probabilities < 1)).all()


def test_gradients_reach_lora_not_the_base(tiny_store: Path, mixed_posts: list[Post]) -> None:
    router = load_router(tiny_store, trainable=True)
    logits = router(router.build_inputs(mixed_posts))
    logits.sum().backward()
    lora_b = [p for n, p in router.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    base = router.base_backbone.model.language_model.layers[0].mlp.up_proj.weight
    assert not base.requires_grad and base.grad is None


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    ],
)
def test_missing_backbone_file_is_named(tiny_store: Path, tmp_path: Path, name: str) -> None:
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    (store / "backbone" / name).unlink()
    with pytest.raises(ModelStoreError) as caught:
        load_router(store)
    assert caught.value.path == store / "backbone" / name
    assert name in str(caught.value)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "preprocessor_config.json"])
def test_corrupt_backbone_file_is_named(tiny_store: Path, tmp_path: Path, name: str) -> None:
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    (store / "backbone" / name).write_bytes(b"\x00 not what it should be {")
    with pytest.raises(ModelStoreError) as caught:
        load_router(store)
    assert caught.value.path == store / "backbone" / name


def test_tiny_router_is_deterministic(tmp_path: Path) -> None:
    first = make_tiny_router(tmp_path / "a", seed=3)
    second = make_tiny_router(tmp_path / "b", seed=3)
    other = make_tiny_router(tmp_path / "c", seed=4)
    files = [
        "head.safetensors",
        "adapter/adapter_model.safetensors",
        "backbone/model.safetensors",
        "backbone/tokenizer.json",
    ]
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "head.safetensors").read_bytes() != (other / "head.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("size", "mode", "shrinks"),
    [
        ((640, 480), "RGB", True),
        ((300, 200), "L", True),
        ((40, 40), "RGB", True),  # rounded down to 32 x 32, the processor's grid
        ((64, 64), "P", False),  # already on the grid
        ((20, 20), "RGB", False),  # the processor enlarges it: left to the processor
        ((700, 31), "RGBA", False),  # its fitted size (32 x 288) would be shrunk again
    ],
)
def test_an_image_fitted_at_decode_time_gives_the_same_inputs(
    backbone: Qwen3VLBackbone, size: tuple[int, int], mode: str, shrinks: bool
) -> None:
    """Serving resizes each image to what the processor makes of it as soon as it is decoded
    (`fit_image`, on the decode pool); the inputs built from that are the upload's, to the bit."""
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    upload = Image.fromarray(pixels, "RGBA").convert(mode)
    fitted = backbone.fit_image(upload)
    assert (fitted is not upload) == shrinks
    if shrinks:
        assert fitted.mode == "RGB" and fitted.size[0] * fitted.size[1] < size[0] * size[1]
    from_upload = backbone.build_inputs([Post(title="t", images=(upload,))])
    from_fitted = backbone.build_inputs([Post(title="t", images=(fitted,))])
    assert from_upload.keys() == from_fitted.keys()
    for key, value in from_upload.items():
        assert torch.equal(value, from_fitted[key]), key
