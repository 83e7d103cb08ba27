"""The on-disk image-feature cache of the dual encoder (app.model.feature_cache).

Hits equal a fresh encode; each distinct image is encoded once across epochs and routers; a
changed encoder (one weight, the image size, the preprocessing) never reads a stale entry;
broken entries are misses that get rewritten; concurrent writers do not corrupt entries; and
`radar train --feature-cache` run twice encodes nothing the second time, with the same result.
All on the tiny random encoders (32-pixel EfficientNet-Lite0, 2-layer BERT).
"""

import json
import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from app.cli import main
from app.data.records import load_post, load_records
from app.model.backbones import dual_encoder
from app.model.backbones.dual_encoder import DualEncoderBackbone, ImageEncoder
from app.model.config import RouterConfig
from app.model.feature_cache import IDENTITY_FILE, FeatureCache, image_digest
from app.model.post import Post
from app.model.router import Router
from app.model.store import load_router, new_router, save_router, write_config
from app.model.tiny_encoders import (
    TINY_IMAGE_SIZE,
    TINY_LORA,
    dual_encoder_router_config,
    text_encoder_router_config,
)

pytest.importorskip("efficientnet_lite_pytorch")

TOLERANCE = 1e-6
# The same image encoded in batches of other sizes: CPU convolutions pick other kernels, ~5e-5.
BATCH_NOISE = 1e-4
WIDTH = 1280


def image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3))
    return Image.fromarray(pixels.astype(np.uint8))


def config_for(encoders: tuple[Path, Path], **overrides: object) -> RouterConfig:
    text, weights = encoders
    values: dict = {
        "path": str(text),
        "image_path": str(weights),
        "image_size": TINY_IMAGE_SIZE,
        "max_images": 3,
        "max_text_tokens": 16,
        "lora": TINY_LORA,
    }
    return dual_encoder_router_config(**(values | overrides))


@pytest.fixture
def config(encoders: tuple[Path, Path]) -> RouterConfig:
    return config_for(encoders)


class EncodeCounter:
    """Counts the images every `ImageEncoder` forward is given (wraps the class's forward)."""

    def __init__(self) -> None:
        self.images = 0


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> EncodeCounter:
    counter = EncodeCounter()
    original = ImageEncoder.forward

    def counting(self: ImageEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
        counter.images += pixel_values.shape[0]
        return original(self, pixel_values)

    monkeypatch.setattr(ImageEncoder, "forward", counting)
    return counter


def backbone_of(router: Router) -> DualEncoderBackbone:
    backbone = router.base_backbone
    assert isinstance(backbone, DualEncoderBackbone)
    return backbone


def pooled(router: Router, posts: list[Post]) -> torch.Tensor:
    with torch.inference_mode():
        return router.backbone(router.build_inputs(posts))


def image_features(router: Router, posts: list[Post]) -> torch.Tensor:
    """The image half of the pooled vectors (the text half never touches the cache)."""
    return pooled(router, posts)[:, -WIDTH:]


POSTS = [
    Post(title="cat video", images=(image(1),)),
    Post(title="sale"),
    Post(title="buy now", images=(image(2, (30, 90)), image(3, (64, 64)))),
]


def test_a_hit_gives_the_features_of_a_fresh_encode(config: RouterConfig, tmp_path: Path):
    plain = new_router(config, tmp_path / "store").eval()
    cached = new_router(config, tmp_path / "store").eval()
    assert cached.use_feature_cache(tmp_path / "cache")
    fresh = pooled(plain, POSTS)
    first = pooled(cached, POSTS)  # all misses: encoded, then stored
    inputs = cached.build_inputs(POSTS)
    assert "pixel_values" not in inputs and inputs["image_features"].shape == (3, WIDTH)
    second = pooled(cached, POSTS)  # all hits
    torch.testing.assert_close(first, fresh, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(second, fresh, atol=TOLERANCE, rtol=0)
    assert torch.equal(first, second)  # an entry holds the encoder's output exactly
    # The stored vector is the encoder's own output for the image, in the batch it came in
    # (CPU convolutions differ by ~1e-5 between batch sizes: the cache fixes one of them).
    encoder = backbone_of(cached).image_encoder
    images = [image for post in POSTS for image in post.images]
    pixels = torch.stack([dual_encoder.preprocess_image(i, TINY_IMAGE_SIZE) for i in images])
    with torch.inference_mode():
        direct = encoder(pixels)[0]
    cache = backbone_of(cached).feature_cache
    assert cache is not None
    identity = backbone_of(cached)._cache_identity(cache)
    stored = cache.get(identity, image_digest(image(1)), WIDTH)
    assert stored is not None
    np.testing.assert_allclose(stored, direct.numpy(), atol=TOLERANCE, rtol=0)


def test_each_image_is_encoded_once_over_epochs_and_routers(
    config: RouterConfig, tmp_path: Path, encoded: EncodeCounter
):
    # 8 distinct images over 6 posts; the last post repeats an image of the first.
    images = [image(seed, (30 + seed, 40)) for seed in range(8)]
    posts = [
        Post(title="a", images=(images[0], images[1])),
        Post(title="b", images=(images[2],)),
        Post(title="c"),
        Post(title="d", images=(images[3], images[4], images[5])),
        Post(title="e", images=(images[6], images[7])),
        Post(title="f", images=(images[0],)),
    ]
    batches = [posts[:3], posts[3:]]
    routers = [new_router(config, tmp_path / "store") for _ in range(2)]
    for router in routers:
        router.train()
        assert router.use_feature_cache(tmp_path / "cache")
        for _epoch in range(3):
            for batch in batches:
                router(router.build_inputs(batch)).sum().backward()
    assert encoded.images == len(images)

    encoded.images = 0
    plain = new_router(config, tmp_path / "store")
    for _epoch in range(3):
        for batch in batches:
            plain(plain.build_inputs(batch))
    assert encoded.images == 3 * 9  # without the cache: every image of every post, each epoch


def test_an_image_twice_in_a_batch_is_encoded_once(
    config: RouterConfig, tmp_path: Path, encoded: EncodeCounter
):
    router = new_router(config, tmp_path / "store").eval()
    router.use_feature_cache(tmp_path / "cache")
    twice = [Post(title="x", images=(image(5), image(5))), Post(title="y", images=(image(5),))]
    inputs = router.build_inputs(twice)
    assert inputs["pixel_values"].shape[0] == 1 and inputs["image_slot"].tolist() == [0, 0, 0]
    plain = new_router(config, tmp_path / "store").eval()
    # One image encoded in a batch of 1 rather than 3.
    torch.testing.assert_close(
        pooled(router, twice), pooled(plain, twice), atol=BATCH_NOISE, rtol=0
    )


def test_bf16_features_are_kept_apart_and_a_hit_equals_the_miss(
    config: RouterConfig, tmp_path: Path
):
    # A CUDA router runs in bf16, whose features are not float32's: one set per precision.
    router = new_router(config, tmp_path / "store").eval()
    router.use_feature_cache(tmp_path / "cache")
    pooled(router, POSTS)
    router.backbone.to(torch.bfloat16)
    backbone = backbone_of(router)
    first_inputs = router.build_inputs(POSTS)
    assert "image_features" not in first_inputs  # the float32 entries are not bf16's
    with torch.inference_mode():
        first = router.backbone(backbone.prepare_for_device(first_inputs))
        second_inputs = router.build_inputs(POSTS)
        assert "pixel_values" not in second_inputs
        second = router.backbone(backbone.prepare_for_device(second_inputs))
    assert second.dtype == torch.bfloat16 and torch.equal(first, second)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_the_image_encoder_is_frozen_and_in_eval_mode_while_training(
    config: RouterConfig, tmp_path: Path
):
    # What makes cached features exact: no gradient reaches the image weights, and neither
    # BatchNorm batch statistics nor stochastic depth are used while the router trains.
    router = new_router(config, tmp_path / "store").train()
    encoder = backbone_of(router).image_encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not any(m.training for m in encoder.modules())


def test_a_trainable_image_encoder_is_not_cached(encoders: tuple[Path, Path], tmp_path: Path):
    router = new_router(config_for(encoders, lora=None), tmp_path / "store")
    backbone_of(router).image_encoder.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="trainable"):
        assert not router.use_feature_cache(tmp_path / "cache")
    assert "pixel_values" in router.build_inputs(POSTS)
    assert not (tmp_path / "cache").exists()


def test_other_backbones_and_loaded_routers_have_no_cache(
    encoders: tuple[Path, Path], config: RouterConfig, tmp_path: Path
):
    text_config = text_encoder_router_config(path=str(encoders[0]), lora=TINY_LORA)
    assert not new_router(text_config, tmp_path / "text").use_feature_cache(tmp_path / "cache")
    # Serving loads with load_router: no disk cache unless asked for.
    store = save_router(new_router(config, tmp_path / "store"), tmp_path / "store")
    assert backbone_of(load_router(store)).feature_cache is None


def cached_features(router: Router, cache: Path, post: Post) -> tuple[torch.Tensor, bool]:
    """The image features of `post` through a cache in `cache`, and whether it was a hit."""
    router.eval().use_feature_cache(cache)
    hit = "image_features" in router.build_inputs([post])
    return image_features(router, [post]), hit


def test_one_changed_weight_is_a_miss_with_the_new_features(
    encoders: tuple[Path, Path], tmp_path: Path
):
    post = Post(title="cat", images=(image(7),))
    cache = tmp_path / "cache"
    original = new_router(config_for(encoders), tmp_path / "store")
    cached_features(original, cache, post)
    assert cached_features(original, cache, post)[1]  # same encoder: a hit

    # One weight changed, saved as another weights file: another encoder.
    state = torch.load(encoders[1], weights_only=True)
    key = "_conv_stem.weight"  # the first layer: every feature moves
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 0.5
    torch.save(state, tmp_path / "changed.pth")
    changed_config = config_for(encoders, image_path=str(tmp_path / "changed.pth"))
    features, hit = cached_features(new_router(changed_config, tmp_path), cache, post)
    assert not hit
    fresh = image_features(new_router(changed_config, tmp_path).eval(), [post])
    torch.testing.assert_close(features, fresh, atol=TOLERANCE, rtol=0)
    assert not torch.allclose(features, cached_features(original, cache, post)[0], atol=1e-4)

    # The same change made in place, the cache enabled again: the key is the weights' digest,
    # not the file's name, so these are the changed encoder's entries.
    with torch.no_grad():
        # Indexed, not `.view(-1)`: after a CPU forward the weights are channels-last.
        backbone_of(original).image_encoder.net._conv_stem.weight[0, 0, 0, 0] += 0.5
    assert cached_features(original, cache, post)[1]
    identities = [p for p in cache.iterdir() if p.is_dir()]
    assert len(identities) == 2
    described = json.loads((identities[0] / IDENTITY_FILE).read_text())
    assert described["architecture"] == "efficientnet-lite0" and described["image_size"] == 32


def test_another_image_size_or_preprocessing_is_a_miss(
    encoders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    post = Post(title="cat", images=(image(8, (50, 70)),))
    cache = tmp_path / "cache"
    small = new_router(config_for(encoders), tmp_path / "store")
    cached_features(small, cache, post)
    assert cached_features(small, cache, post)[1]

    large_config = config_for(encoders, image_size=48)
    features, hit = cached_features(new_router(large_config, tmp_path / "store"), cache, post)
    assert not hit
    fresh = image_features(new_router(large_config, tmp_path / "store").eval(), [post])
    torch.testing.assert_close(features, fresh, atol=TOLERANCE, rtol=0)

    monkeypatch.setattr(dual_encoder, "PREPROCESS_VERSION", "letterbox-bicubic-v2")
    assert not cached_features(small, cache, post)[1]
    monkeypatch.setattr(dual_encoder, "PIXEL_STD", 64.0)
    assert not cached_features(small, cache, post)[1]


def test_the_image_digest_is_of_the_pixels_not_the_file(tmp_path: Path):
    picture = image(9, (20, 10))
    picture.save(tmp_path / "a.png", compress_level=1)
    picture.save(tmp_path / "b.png", compress_level=9, pnginfo=None)
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
        assert image_digest(a) == image_digest(b) == image_digest(picture)
    changed = picture.copy()
    changed.putpixel((0, 0), (0, 0, 0) if picture.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    assert image_digest(changed) != image_digest(picture)
    # Same bytes, other shape: another image.
    assert image_digest(picture) != image_digest(
        Image.frombytes("RGB", (10, 20), picture.tobytes())
    )


def broken_entries() -> dict[str, Callable[[bytes], bytes]]:
    def flip_last(data: bytes) -> bytes:  # a payload bit: only the checksum notices
        return data[:-1] + bytes([data[-1] ^ 0x01])

    return {
        "truncated": lambda data: data[: len(data) // 2],
        "empty": lambda data: b"",
        "garbage": lambda data: b"\xff" * len(data),
        "flipped bit": flip_last,
    }


@pytest.mark.parametrize("damage", sorted(broken_entries()))
def test_a_broken_entry_is_a_miss_and_is_rewritten(
    config: RouterConfig, tmp_path: Path, damage: str, encoded: EncodeCounter
):
    post = Post(title="cat", images=(image(10),))
    router = new_router(config, tmp_path / "store").eval()
    router.use_feature_cache(tmp_path / "cache")
    expected = image_features(router, [post])
    [entry] = (tmp_path / "cache").rglob("*.safetensors")
    entry.write_bytes(broken_entries()[damage](entry.read_bytes()))

    encoded.images = 0
    torch.testing.assert_close(image_features(router, [post]), expected, atol=TOLERANCE, rtol=0)
    assert encoded.images == 1  # read as a miss, encoded again
    cache = backbone_of(router).feature_cache
    assert cache is not None and cache.stats.bad == 1
    assert "image_features" in router.build_inputs([post])  # rewritten: a hit now
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_an_unwritable_cache_warns_and_scores_anyway(config: RouterConfig, tmp_path: Path):
    (tmp_path / "cache").write_text("a file where the directory should be")
    router = new_router(config, tmp_path / "store").eval()
    router.use_feature_cache(tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        features = image_features(router, POSTS)
    plain = image_features(new_router(config, tmp_path / "store").eval(), POSTS)
    torch.testing.assert_close(features, plain, atol=TOLERANCE, rtol=0)


KEYS = [bytes([index]) * 32 for index in range(40)]


def vector(index: int) -> np.ndarray:
    return np.arange(WIDTH, dtype=np.float32) * (index + 1)


def hammer(directory: str, rounds: int) -> int:
    """Write and read every key `rounds` times; returns how many reads were wrong."""
    cache = FeatureCache(directory)
    wrong = 0
    for _ in range(rounds):
        for index, key in enumerate(KEYS):
            cache.put("same-encoder", key, vector(index))
            got = cache.get("same-encoder", key, WIDTH)
            wrong += got is None or not np.array_equal(got, vector(index))
    return wrong + cache.stats.bad


def test_concurrent_writers_do_not_corrupt_entries(tmp_path: Path):
    directory = str(tmp_path / "cache")
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(hammer(directory, 5))) for _ in range(3)
    ]
    # fork: the children run only numpy and file code, no torch threads.
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        pending = [pool.apply_async(hammer, (directory, 5)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results += [p.get(timeout=60) for p in pending]
    assert results == [0] * 5
    cache = FeatureCache(directory)
    for index, key in enumerate(KEYS):
        got = cache.get("same-encoder", key, WIDTH)
        assert got is not None and np.array_equal(got, vector(index))
    assert not list(Path(directory).rglob("*.tmp"))


# --- end to end: `radar train --feature-cache` ------------------------------------------------


def write_image_dataset(directory: Path, n: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        names = []
        for j in range(i % 3):  # 0, 1 or 2 images a post, all distinct
            name = f"img-{i}-{j}.png"
            image(100 + 3 * i + j, (24 + i, 30)).save(directory / name)
            names.append(name)
        positive = i % 2
        record = {
            "post_id": f"p{i}",
            "title": f"buy spam now {i}" if positive else f"my cat video {i}",
            "images": names,
            "labels": {"violence": positive, "adult": -1, "spam": 1 - positive},
        }
        lines.append(json.dumps(record))
    path = directory / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_radar_train_twice_with_a_feature_cache(
    config: RouterConfig, tmp_path: Path, encoded: EncodeCounter
):
    data = write_image_dataset(tmp_path / "data", 9)  # 9 distinct images
    (tmp_path / "config").mkdir()
    write_config(config, tmp_path / "config")

    def radar_train(out: str) -> dict[str, torch.Tensor]:
        argv = [
            "train", "--data", str(data), "--model-config", str(tmp_path / "config"),
            "--out", str(tmp_path / out), "--feature-cache", str(tmp_path / "cache"),
            "--epochs", "3", "--batch-size", "4", "--lambda", "0", "--lr", "1e-3",
            "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
        store = tmp_path / out
        return load_file(store / "head.safetensors") | load_file(
            store / "adapter" / "adapter_model.safetensors"
        )

    first = radar_train("first")
    assert encoded.images == 9  # 3 epochs, each image encoded in the first only
    encoded.images = 0
    second = radar_train("second")
    assert encoded.images == 0
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name

    # Scoring the saved router (what teach, evaluate and calibrate load) reads the same
    # entries: a loaded store's image encoder has the training router's digest.
    router = load_router(tmp_path / "second")
    posts = [load_post(item) for item in load_records(data, router.categories).records]
    assert router.use_feature_cache(tmp_path / "cache")
    scores = router.predict_proba(posts)
    assert encoded.images == 0
    router.use_feature_cache(None)
    torch.testing.assert_close(scores, router.predict_proba(posts), atol=BATCH_NOISE, rtol=0)
    assert encoded.images == 9
