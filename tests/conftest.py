"""Shared fixtures: a tiny random Qwen3-VL router store, and small random RGB images."""

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.model.tiny import make_tiny_router
from tests.postgres import postgres_server, postgres_url  # noqa: F401

# Fixtures of decision logs on both backends (log_backend, new_log).
pytest_plugins = ("tests.logs",)

# Varied aspect ratios and sizes: below min_pixels, above max_pixels, wide, tall, square.
IMAGE_SIZES = ((40, 30), (100, 50), (20, 20), (64, 64), (30, 90), (128, 96), (50, 50))

ImageFactory = Callable[..., tuple[Image.Image, ...]]

# Root reads any file whatever its mode (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH); a child
# started through this does not, so a test running as root can still see "permission denied".
NO_DAC_OVERRIDE = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
    "--",
)


def random_images(count: int, seed: int = 0) -> tuple[Image.Image, ...]:
    """`count` random RGB images cycling through `IMAGE_SIZES` (width, height)."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        width, height = IMAGE_SIZES[(index + seed) % len(IMAGE_SIZES)]
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    return tuple(images)


@pytest.fixture(scope="session", autouse=True)
def decision_log_outside_the_checkout(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """Services the tests start without naming a decision log (in-process or as subprocesses,
    which inherit the environment) log into a temporary file, not `data/` of the checkout."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("decision-log")
        patch.setenv("RADAR_DECISION_LOG_PATH", str(folder / "decision_log.sqlite3"))
        yield


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL router in the model-store layout (built once per session).

    Treat it as read-only; tests that break files copy it first.
    """
    return make_tiny_router(tmp_path_factory.mktemp("tiny_store") / "router")


@pytest.fixture
def make_images() -> ImageFactory:
    """A factory of small random RGB PIL images of varied sizes: `make_images(n, seed=0)`."""
    return random_images


@pytest.fixture(scope="session")
def modes_enforced(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """A command prefix under which file modes hold: none for a normal user, `setpriv`
    without the DAC capabilities for root. Skips when neither makes a mode-000 file unreadable
    (no setpriv, or a container that may not drop capabilities)."""
    prefix = NO_DAC_OVERRIDE if os.geteuid() == 0 else ()
    if prefix and shutil.which(prefix[0]) is None:
        pytest.skip("running as root without setpriv: file modes are not enforced")
    folder = tmp_path_factory.mktemp("modes")
    readable, denied = folder / "readable", folder / "denied"
    readable.write_text("x")
    denied.write_text("x")
    denied.chmod(0)

    def cat(path: Path) -> int:
        command = [*prefix, "cat", str(path)]
        return subprocess.run(command, capture_output=True, check=False).returncode

    if cat(readable) != 0 or cat(denied) == 0:
        pytest.skip("cannot run a child process that honours file modes here")
    return prefix
