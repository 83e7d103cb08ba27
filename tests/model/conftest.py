"""The tiny random encoders (app.model.tiny_encoders) on disk, built once per test module."""

from pathlib import Path

import pytest

from app.model.tiny_encoders import make_tiny_image_encoder_weights, make_tiny_text_encoder_dir


@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_encoder_dir(tmp_path_factory.mktemp("tiny") / "text")


@pytest.fixture(scope="module")
def tiny_image_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("efficientnet_lite_pytorch")
    return make_tiny_image_encoder_weights(tmp_path_factory.mktemp("tiny") / "lite0.pth")


@pytest.fixture(scope="module")
def encoders(tiny_text_dir: Path, tiny_image_weights: Path) -> tuple[Path, Path]:
    """(text-encoder directory, image-encoder weights) of the dual encoder."""
    return tiny_text_dir, tiny_image_weights
