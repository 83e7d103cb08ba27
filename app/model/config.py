"""The router's JSON config (`router.json` in a model-store directory), validated by pydantic."""

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.model.errors import ModelStoreError
from app.model.files import is_file

BackboneFamily = Literal["qwen3_vl", "dual_encoder", "text_encoder"]
Pooling = Literal["last_token", "mean", "cls"]
PACKAGE_PREFIX = "package:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneConfig(_Strict):
    """Which backbone to build and where its weights are.

    Paths are absolute, relative to the model-store directory, or `package:<module>[/<sub>]`
    for weights shipped inside an installed Python package (MiniLM, EfficientNet-Lite0).
    """

    family: BackboneFamily
    path: str = Field(description="the VLM or text-encoder directory (from_pretrained layout)")
    image_path: str | None = Field(
        default=None, description="dual encoder only: the image encoder's weights"
    )
    # Left out or null, it takes the family's own (see `_family_pooling`).
    pooling: Pooling = Field(description="last_token for a decoder VLM, mean for encoders")
    max_text_tokens: int = Field(default=256, ge=8, le=32768)
    max_images: int = Field(default=4, ge=0, le=64)
    image_size: int = Field(default=224, ge=32, le=1024, description="encoder image side")

    @model_validator(mode="before")
    @classmethod
    def _family_pooling(cls, data: Any) -> Any:
        # MiniLM was trained with mean pooling; its last token is [SEP]. A decoder's is the
        # only token that has seen the whole post.
        if isinstance(data, dict) and data.get("pooling") is None and "family" in data:
            data = {**data, "pooling": "last_token" if data["family"] == "qwen3_vl" else "mean"}
        return data

    @model_validator(mode="after")
    def _check_family(self) -> "BackboneConfig":
        if self.family == "dual_encoder" and self.image_path is None:
            raise ValueError("a dual_encoder backbone needs image_path")
        if self.family == "qwen3_vl" and self.pooling != "last_token":
            raise ValueError("a decoder VLM pools the last real token (pooling: last_token)")
        return self


class HeadConfig(_Strict):
    """MLP to the shared representation, then one linear head per category."""

    hidden_dims: tuple[int, ...] = (256,)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


class LoraSettings(_Strict):
    """LoRA on the backbone through peft (paper: rank 128, alpha 256).

    A router whose `lora` is null keeps its backbone frozen (the store saves no backbone
    weights, only the MLP, heads and extras), unless `full_finetune` says it trained it all.
    """

    r: int = Field(default=128, ge=1)
    alpha: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] | None = Field(
        default=None, description="module names; None takes the backbone's defaults"
    )


class QuantizationSettings(_Strict):
    """An int8 CPU router (`radar quantize`, `app.model.quantize`): the text encoder runs as
    a dynamically quantized ONNX graph, a file of the store; what `fp32` names stays float32."""

    runtime: Literal["onnxruntime"] = "onnxruntime"
    method: Literal["dynamic_int8"] = "dynamic_int8"
    text_encoder: str = Field(
        default="text_encoder.int8.onnx", description="the int8 ONNX text encoder, in the store"
    )
    per_channel: bool = True
    fp32: tuple[str, ...] = Field(default=(), description="what was left in float32")
    source_model_version: str = Field(default="", description="the fp32 router it came from")


class RouterConfig(_Strict):
    """Everything needed, beside the weight files, to rebuild one router."""

    format_version: Literal[1] = 1
    model_version: str = Field(min_length=1, max_length=128)
    categories: tuple[str, ...] = Field(min_length=1)
    backbone: BackboneConfig
    head: HeadConfig = HeadConfig()
    lora: LoraSettings | None = LoraSettings()
    # A full fine-tune (`radar train --full-finetune`): no LoRA, and the backbone weights it
    # trained are in the store's `backbone.safetensors`, loaded over the pretrained ones. The
    # store writes the key only when true, so stores without it read as before.
    full_finetune: bool = False
    # Blended with a per-category n-gram model (`app.model.lexical`), whose files
    # (`lexical.json`, `lexical.safetensors`) the store then carries. Written only when true.
    lexical_head: bool = False
    # An int8 router: its text encoder is the store's quantized ONNX graph (LoRA merged into
    # it, so lora is null and there is no backbone.safetensors). Written only when set.
    quantization: QuantizationSettings | None = None

    @model_validator(mode="after")
    def _one_way_to_train(self) -> "RouterConfig":
        if self.full_finetune and self.lora is not None:
            raise ValueError("full_finetune replaces LoRA: lora must be null")
        if self.quantization is not None and (self.lora is not None or self.full_finetune):
            raise ValueError(
                "a quantized router has its weights in its ONNX file: lora must be "
                "null and full_finetune false"
            )
        return self

    @field_validator("categories")
    @classmethod
    def _unique_names(cls, categories: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories repeat: {list(categories)}")
        for name in categories:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"category {name!r}: use letters, digits and underscores")
        return categories


def resolve_path(reference: str, store_dir: Path) -> Path:
    """Turn a path reference from `router.json` into a local path; never touches the network."""
    if reference.startswith(PACKAGE_PREFIX):
        module, _, sub = reference[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelStoreError(
                store_dir / "router.json", f"package {module!r} is not installed ({reference})"
            )
        root = Path(next(iter(spec.submodule_search_locations)))
        return root / sub if sub else root
    path = Path(reference)
    return path if path.is_absolute() else store_dir / path


# Reading a store's config needs no torch: `radar thresholds --model` stays instant.
CONFIG_FILE = "router.json"


def read_config(store_dir: Path) -> RouterConfig:
    """Parse and validate `router.json`; errors name the file and the problem."""
    return read_config_file(Path(store_dir) / CONFIG_FILE)


def read_config_file(path: Path) -> RouterConfig:
    """Parse and validate a router config JSON (a store's router.json or a training config)."""
    if not is_file(path):
        raise ModelStoreError(path, "missing (is this a model-store directory?)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelStoreError(path, f"cannot read: {exc.strerror}") from None
    try:
        return RouterConfig.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ModelStoreError(path, f"invalid router config: {problems}") from None
