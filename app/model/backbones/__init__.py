"""Backbone families behind one interface; `load_backbone` picks the class from the config."""

from pathlib import Path

from app.model.backbones.base import Backbone
from app.model.config import BackboneConfig


def backbone_class(family: str) -> type[Backbone]:
    """The class implementing a backbone family (imported lazily: each pulls its own deps)."""
    if family == "qwen3_vl":
        from app.model.backbones.qwen3_vl import Qwen3VLBackbone

        return Qwen3VLBackbone
    if family == "dual_encoder":
        from app.model.backbones.dual_encoder import DualEncoderBackbone

        return DualEncoderBackbone
    if family == "text_encoder":
        from app.model.backbones.text_encoder import TextEncoderBackbone

        return TextEncoderBackbone
    raise ValueError(f"unknown backbone family {family!r}")


def load_backbone(config: BackboneConfig, store_dir: Path) -> Backbone:
    """Build the backbone of `config` from local files only (HF offline mode)."""
    return backbone_class(config.family).load(config, store_dir)


__all__ = ["Backbone", "backbone_class", "load_backbone"]
