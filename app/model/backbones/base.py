"""The interface every backbone family implements.

A backbone owns its preprocessing (tokenizer, image processor) so that serving and training
build inputs with the same code: `build_inputs(posts)` returns CPU tensors, `forward(inputs)`
returns one pooled vector per post.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Self

import torch
from PIL import Image
from torch import nn

from app.model.config import BackboneConfig
from app.model.post import Post


class Backbone(nn.Module, ABC):
    """A pretrained encoder or decoder VLM pooled to one vector per post.

    Trainable parameters that are neither base weights nor LoRA (e.g. the dual encoder's
    learned "no image" embedding) live in `self.extras`; the model store saves them with the
    MLP and heads, and LoRA wrapping leaves them trainable.
    """

    family: ClassVar[str]
    # Module names LoRA targets when the config names none.
    default_lora_targets: ClassVar[tuple[str, ...]]

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.extras = nn.ParameterDict()

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the pooled vector `forward` returns."""

    @classmethod
    @abstractmethod
    def load(cls, config: BackboneConfig, store_dir: Path) -> Self:
        """Load from the local paths of `config` (resolved against `store_dir`), offline.

        Raises `ModelStoreError` naming the file when something is missing or broken.
        """

    @abstractmethod
    def build_inputs(self, posts: Sequence[Post]) -> dict[str, torch.Tensor]:
        """Collate posts into CPU tensors: the one input builder of serving and training."""

    @abstractmethod
    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pooled vectors, shape `[batch, hidden_size]`, for inputs from `build_inputs`."""

    def fit_image(self, image: Image.Image) -> Image.Image:
        """What serving may do to a decoded image as soon as it is decoded (in the request's
        decode pool, within its deadline) so that `build_inputs` later computes the same
        inputs from it, more cheaply: by default nothing. A family that only ever looks at
        a small version of an image returns that version, and a 25 M-pixel upload is not
        resized on the batch's shared preparing path or held whole until its batch."""
        return image

    def use_feature_cache(self, directory: Path | str | None) -> bool:
        """Cache the features of frozen parts on disk in `directory`; True if this family can.

        Opt-in for offline work (training, teach, evaluate, calibrate), never for serving.
        Families with no frozen part worth caching ignore it: this default returns False.
        """
        return False

    def prepare_for_device(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move inputs to this backbone's device; floating tensors take its dtype."""
        param = next(self.parameters(), None)
        if param is None:  # an int8 text encoder (app.model.quantize) holds no torch weights
            return dict(inputs)
        moved = {}
        for name, tensor in inputs.items():
            if tensor.is_floating_point():
                moved[name] = tensor.to(param.device, dtype=param.dtype, non_blocking=True)
            else:
                moved[name] = tensor.to(param.device, non_blocking=True)
        return moved
