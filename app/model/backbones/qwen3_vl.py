"""Qwen3-VL as a router backbone: the decoder's last hidden state at the post's last real token.

`Qwen3VLProcessor` cannot be built without torchvision (DESIGN.md, environment facts), so this
module does the processor's work with the tokenizer and `Qwen2VLImageProcessorPil`: render the
chat template, expand each `<|image_pad|>` to its visual-token count, build `mm_token_type_ids`,
and pad on the right. It is the one input builder of serving and training.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image
from safetensors import SafetensorError
from tokenizers import Tokenizer
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen3VLModel,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
    smart_resize,
)

from app.model.backbones.base import Backbone
from app.model.config import BackboneConfig, resolve_path
from app.model.errors import InputError, ModelStoreError
from app.model.files import is_dir, is_file
from app.model.post import Post

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
SYSTEM_PROMPT = "Score this post for content moderation risk."
# Stands in for the post text while the template renders; a private-use character keeps it
# from ever colliding with the template or the system prompt.
_TEXT_MARKER = "\ue000RADAR_POST_TEXT\ue000"
REQUIRED_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")


class Qwen3VLBackbone(Backbone):
    """Qwen3-VL (`Qwen3VLModel`, no LM head) pooled at the last real token of each post."""

    family = "qwen3_vl"
    # Language-model attention only: the vision tower's attention is named `qkv` / `proj`.
    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(
        self,
        config: BackboneConfig,
        model: Qwen3VLModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
    ) -> None:
        super().__init__(config)
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = int(model.config.image_token_id)
        self.merge_size = int(image_processor.merge_size)
        pad_id = tokenizer.pad_token_id
        self.pad_token_id = int(pad_id if pad_id is not None else tokenizer.eos_token_id)
        self._text_encoder = _plain_text_encoder(tokenizer)
        # Rendered template per image count: it depends on nothing else, and Jinja is slow.
        self._prompts: dict[int, tuple[str, str]] = {}

    @property
    def hidden_size(self) -> int:
        """Width of the language model's hidden state."""
        return int(self.model.config.text_config.hidden_size)

    @classmethod
    def load(cls, config: BackboneConfig, store_dir: Path) -> Self:
        """Tokenizer, image processor and `Qwen3VLModel` from one local directory, offline."""
        path = resolve_path(config.path, store_dir)
        if not is_dir(path):
            raise ModelStoreError(path, "Qwen3-VL backbone directory does not exist")
        _check_files(path)
        weights = _weights_file(path)
        tokenizer = _load_part(path / "tokenizer.json", AutoTokenizer.from_pretrained)
        if not tokenizer.chat_template:
            tokenizer.chat_template = _read_chat_template(path)
        image_processor = _load_part(
            path / "preprocessor_config.json", AutoImageProcessor.from_pretrained
        )
        model = _load_part(weights, Qwen3VLModel.from_pretrained)
        try:
            backbone = cls(config, model, tokenizer, image_processor)
        except TypeError as exc:
            raise ModelStoreError(path / "tokenizer.json", str(exc)) from None
        backbone._check_ids(path)
        backbone._check_budget(store_dir)
        return backbone

    def save_pretrained(self, directory: Path | str) -> None:
        """Write model, tokenizer and image processor in the `from_pretrained` layout."""
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))

    def build_inputs(self, posts: Sequence[Post]) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, `attention_mask`, `mm_token_type_ids` (+ image tensors).

        Images of the whole batch go through the image processor together, in placeholder order;
        `pixel_values` and `image_grid_thw` are left out when no post has an image.
        """
        if not posts:
            raise InputError("no posts to build inputs for")
        for index, post in enumerate(posts):
            if len(post.images) > self.config.max_images:
                raise InputError(
                    f"post {index} has {len(post.images)} images; this backbone takes at most "
                    f"{self.config.max_images} (max_images)"
                )
        images = [image for post in posts for image in post.images]
        vision = self._process_images(images) if images else {}
        counts = self._image_token_counts(vision.get("image_grid_thw"))
        rows, start = [], 0
        for post in posts:
            rows.append(self._post_ids(post, counts[start : start + len(post.images)]))
            start += len(post.images)
        return self._pad(rows) | vision

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden state at each row's last real token (by `attention_mask`): `[B, hidden]`."""
        outputs = self.model(**inputs, use_cache=False)
        hidden = outputs.last_hidden_state
        # Right padding: the last real token is at attention_mask.sum - 1, whatever the pad id.
        last = inputs["attention_mask"].sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def fit_image(self, image: Image.Image) -> Image.Image:
        """The image in RGB at the size the image processor resizes it to (`smart_resize`, its
        resampling filter): all `build_inputs` reads of it.

        The processor's own resize of the result is then a same-size PIL resize, which PIL
        returns unchanged, so the inputs are the very same as from the upload
        (`tests/model/test_qwen3_vl.py`). An image the processor would keep or enlarge, or
        whose fitted size the processor would move again, is returned as it is; so is any
        image for a processor other than the PIL one this holds for.
        """
        processor = self.image_processor
        if not (
            isinstance(processor, Qwen2VLImageProcessorPil)
            and processor.do_resize
            and processor.do_convert_rgb
        ):
            return image
        width, height = image.size
        target = self._processor_size(height, width)
        if target is None or target[0] * target[1] >= height * width:
            return image
        if self._processor_size(*target) != target:
            return image
        return _as_rgb(image).resize((target[1], target[0]), resample=processor.resample)

    def _processor_size(self, height: int, width: int) -> tuple[int, int] | None:
        """(height, width) the image processor resizes an image to; None where it refuses."""
        processor = self.image_processor
        try:
            return smart_resize(
                height,
                width,
                factor=processor.patch_size * processor.merge_size,
                min_pixels=processor.size.shortest_edge,
                max_pixels=processor.size.longest_edge,
            )
        except (ValueError, ZeroDivisionError):  # aspect ratio over 200: build_inputs says so
            return None

    def prompt_parts(self, n_images: int) -> tuple[str, str]:
        """The rendered chat template before and after the post text, for `n_images` images."""
        if n_images not in self._prompts:
            self._prompts[n_images] = self._render_prompt(n_images)
        return self._prompts[n_images]

    def _render_prompt(self, n_images: int) -> tuple[str, str]:
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": _TEXT_MARKER})
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": content},
        ]
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        before, marker, after = str(rendered).partition(_TEXT_MARKER)
        if not marker:
            raise InputError("the tokenizer's chat template dropped the post text")
        return before, after

    def _post_ids(self, post: Post, image_counts: Sequence[int]) -> list[int]:
        before, after = self.prompt_parts(len(image_counts))
        before = _expand_image_pads(before, image_counts)
        prefix = self._encode(before, allow_special=True)
        suffix = self._encode(after, allow_special=True)
        n_pads = sum(image_counts)
        # The budget counts every non-image token: the template's and the post text's.
        budget = self.config.max_text_tokens - (len(prefix) - n_pads) - len(suffix)
        text = self._encode(post.text(), allow_special=False)[: max(budget, 0)]
        return prefix + text + suffix

    def _encode(self, text: str, *, allow_special: bool) -> list[int]:
        if allow_special:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        # The post's own text never yields special tokens: a title containing "<|image_pad|>"
        # must not add an image placeholder or close the turn.
        return list(self._text_encoder.encode(text, add_special_tokens=False).ids)

    def _process_images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        try:
            processed = self.image_processor(images=list(images), return_tensors="pt")
        except (ValueError, TypeError, OSError) as exc:
            raise InputError(f"an image cannot be preprocessed: {exc}") from exc
        return {
            "pixel_values": processed["pixel_values"],
            "image_grid_thw": processed["image_grid_thw"].long(),
        }

    def _image_token_counts(self, grid_thw: torch.Tensor | None) -> list[int]:
        """Visual tokens per image, as Qwen3VLProcessor counts them."""
        if grid_thw is None:
            return []
        return (grid_thw.prod(dim=-1) // self.merge_size**2).tolist()

    def _pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, : len(row)] = 1
        # Qwen3VLModel.get_rope_index reads 0 = text, 1 = image (2 = video); int64 like the
        # processor's output. Only image placeholders are marked, pads stay 0.
        mm_token_type_ids = (input_ids == self.image_token_id).long()
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
        }

    def _check_ids(self, path: Path) -> None:
        token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id != self.image_token_id:
            raise ModelStoreError(
                path / "config.json",
                f"image_token_id {self.image_token_id} is not the tokenizer's {IMAGE_TOKEN} "
                f"id ({token_id})",
            )

    def _check_budget(self, store_dir: Path) -> None:
        """Fail at load, not per post, when the template alone exceeds max_text_tokens."""
        before, after = self.prompt_parts(self.config.max_images)
        # Each image's single unexpanded placeholder is not a text token.
        n_tokens = len(self._encode(before + after, allow_special=True))
        overhead = n_tokens - self.config.max_images
        if overhead >= self.config.max_text_tokens:
            raise ModelStoreError(
                store_dir / "router.json",
                f"backbone.max_text_tokens {self.config.max_text_tokens} leaves no room for the "
                f"post text: the prompt takes {overhead} tokens with max_images images",
            )


def _as_rgb(image: Image.Image) -> Image.Image:
    """RGB as the image processor's `convert_to_rgb` makes it (transparency composited onto
    white), without its round trip through numpy: on the decode pool, a 25 M-pixel upload is
    not copied twice more (`tests/model/test_qwen3_vl.py` holds the two to the same inputs)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _plain_text_encoder(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """A private copy of the fast tokenizer that encodes special-token strings as plain text.

    A copy, not `split_special_tokens=True` per call: that flag is state on the shared backend,
    so two threads building inputs at once could see each other's setting.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"Qwen3-VL needs a fast tokenizer, got {type(tokenizer).__name__}")
    plain = Tokenizer.from_str(backend.to_str())
    plain.encode_special_tokens = True
    return plain


def _expand_image_pads(text: str, counts: Sequence[int]) -> str:
    """Replace the i-th `<|image_pad|>` with counts[i] copies, as Qwen3VLProcessor does."""
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(counts):
        raise InputError(
            f"the chat template rendered {len(pieces) - 1} image placeholders for "
            f"{len(counts)} images"
        )
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:], strict=True):
        out.append(IMAGE_TOKEN * count + piece)
    return "".join(out)


def _check_files(path: Path) -> None:
    """Name the missing or broken file up front; `from_pretrained` errors are vaguer."""
    for name in REQUIRED_FILES:
        if not is_file(path / name):
            raise ModelStoreError(path / name, "missing from the Qwen3-VL backbone directory")
    if not is_file(path / "tokenizer.json") and not is_file(path / "vocab.json"):
        raise ModelStoreError(path / "tokenizer.json", "missing: the backbone has no tokenizer")
    config = _read_json(path / "config.json")
    if config.get("model_type") != "qwen3_vl":
        raise ModelStoreError(
            path / "config.json", f"model_type is {config.get('model_type')!r}, not 'qwen3_vl'"
        )


def _weights_file(path: Path) -> Path:
    """The single or sharded safetensors weights (the shards are checked on loading)."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if is_file(path / name):
            return path / name
    raise ModelStoreError(path / "model.safetensors", "missing: the backbone has no weights")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelStoreError(path, f"not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ModelStoreError(path, "not a JSON object")
    return data


def _read_chat_template(path: Path) -> str:
    """The template from the processor's files, for checkpoints whose tokenizer lacks one."""
    if is_file(path / "chat_template.jinja"):
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if is_file(path / "chat_template.json"):
        template = _read_json(path / "chat_template.json").get("chat_template")
        if isinstance(template, str) and template:
            return template
    raise ModelStoreError(
        path / "chat_template.jinja", "missing: the tokenizer has no chat template"
    )


def _load_part(file: Path, loader: Any) -> Any:
    """Call a `from_pretrained` on the file's directory, offline; failures name the file."""
    try:
        return loader(str(file.parent), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise ModelStoreError(file, f"cannot be loaded: {type(exc).__name__}: {exc}") from exc
