"""The model store: bit-exact round trips, and errors that name the broken file."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.model.errors import ModelStoreError
from app.model.post import Post
from app.model.router import Router
from app.model.store import ADAPTER_DIR, CONFIG_FILE, HEAD_FILE, load_router, save_router


@pytest.fixture
def store(tiny_store: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny store, free to break."""
    return Path(shutil.copytree(tiny_store, tmp_path / "store"))


def _perturb(router: Router, seed: int) -> None:
    """Randomise LoRA and head weights: freshly built LoRA B is zero and would hide a bad load."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in router.named_parameters():
            if "lora_" in name or name.startswith(("mlp.", "heads.")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _error_for(store: Path) -> ModelStoreError:
    with pytest.raises(ModelStoreError) as caught:
        load_router(store)
    return caught.value


def test_save_then_load_is_bit_exact(store: Path, make_images) -> None:
    router = load_router(store)
    before = router.predict_proba([Post(title="before")])
    _perturb(router, seed=7)
    save_router(router, store)
    loaded = load_router(store)

    saved_state, loaded_state = router.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert any("lora_B" in key for key in saved_state)
    for key, tensor in saved_state.items():
        assert torch.equal(tensor, loaded_state[key]), key

    posts = [
        Post(title="before"),
        Post(title="a cat", ocr_text="follow", images=make_images(1, seed=1)),
        Post(ocr_text="three pictures", images=make_images(3, seed=2)),
    ]
    scores = loaded.predict_proba(posts)
    assert torch.equal(router.eval().predict_proba(posts), scores)
    # The perturbed weights really reached the scores.
    assert not torch.allclose(before, scores[:1])


def test_missing_router_json_is_named(store: Path) -> None:
    (store / CONFIG_FILE).unlink()
    error = _error_for(store)
    assert error.path == store / CONFIG_FILE
    assert CONFIG_FILE in str(error)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_adapter_file_is_named(store: Path, name: str) -> None:
    (store / ADAPTER_DIR / name).unlink()
    error = _error_for(store)
    assert error.path == store / ADAPTER_DIR / name
    assert name in str(error)


def test_missing_head_file_is_named(store: Path) -> None:
    (store / HEAD_FILE).unlink()
    error = _error_for(store)
    assert error.path == store / HEAD_FILE


@pytest.mark.parametrize(
    "content", [b"", b"not safetensors at all", b"\xff" * 8 + b"{}", b"\x02\x00\x00\x00\x00"]
)
def test_corrupt_head_file_is_named(store: Path, content: bytes) -> None:
    (store / HEAD_FILE).write_bytes(content)
    error = _error_for(store)
    assert error.path == store / HEAD_FILE
    assert HEAD_FILE in str(error)


def test_head_of_another_router_is_named(store: Path) -> None:
    config = json.loads((store / CONFIG_FILE).read_text())
    config["categories"] = [*config["categories"], "extra"]
    (store / CONFIG_FILE).write_text(json.dumps(config))
    error = _error_for(store)
    assert error.path == store / HEAD_FILE
    assert "heads.extra" in str(error)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{ not json", "invalid router config"),
        ('{"model_version": "x"}', "categories"),
        ("[]", "invalid router config"),
    ],
)
def test_invalid_router_json_is_named(store: Path, content: str, problem: str) -> None:
    (store / CONFIG_FILE).write_text(content)
    error = _error_for(store)
    assert error.path == store / CONFIG_FILE
    assert problem in str(error)


@pytest.mark.parametrize(
    ("field", "value"),
    [("categories", []), ("categories", ["lqc", "lqc"]), ("format_version", 2)],
)
def test_invalid_router_field_is_named(store: Path, field: str, value: object) -> None:
    config = json.loads((store / CONFIG_FILE).read_text())
    config[field] = value
    (store / CONFIG_FILE).write_text(json.dumps(config))
    error = _error_for(store)
    assert error.path == store / CONFIG_FILE
    assert field in str(error)


def test_unknown_backbone_family_is_named(store: Path) -> None:
    config = json.loads((store / CONFIG_FILE).read_text())
    config["backbone"]["family"] = "gpt"
    (store / CONFIG_FILE).write_text(json.dumps(config))
    error = _error_for(store)
    assert error.path == store / CONFIG_FILE
    assert "backbone.family" in str(error)


def test_missing_store_directory_is_named(tmp_path: Path) -> None:
    error = _error_for(tmp_path / "nowhere")
    assert error.path == tmp_path / "nowhere"


def test_unreadable_file_is_permission_denied_not_missing(store: Path, monkeypatch) -> None:
    real_open = Path.open

    def denying_open(self: Path, *args, **kwargs):
        if self == store / HEAD_FILE:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denying_open)
    error = _error_for(store)
    assert error.path == store / HEAD_FILE
    assert error.problem.startswith("permission denied")


# Run in a child that honours file modes (root does not): `modes_enforced` in conftest.
_LOAD_WITH_MODE_000 = """
import json, sys
from pathlib import Path
from app.model.errors import ModelStoreError
from app.model.store import load_router
store, found = Path(sys.argv[1]), {}
for name in json.loads(sys.argv[2]):
    target = store / name
    mode = target.stat().st_mode
    target.chmod(0)
    try:
        load_router(store)
        found[name] = None
    except ModelStoreError as exc:
        found[name] = [str(exc.path), exc.problem]
    finally:
        target.chmod(mode)
print(json.dumps(found))
"""


def test_store_with_mode_000_parts_says_permission_denied(
    store: Path, modes_enforced: tuple[str, ...]
) -> None:
    """The real thing: chmod 000 on the store, a directory or a file in it."""
    names = [
        ".",
        CONFIG_FILE,
        HEAD_FILE,
        ADAPTER_DIR,
        f"{ADAPTER_DIR}/adapter_model.safetensors",
        "backbone",
        "backbone/model.safetensors",
    ]
    command = [*modes_enforced, sys.executable, "-c", _LOAD_WITH_MODE_000, str(store)]
    result = subprocess.run(
        [*command, json.dumps(names)], capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name in names:
        assert found[name] is not None, name
        path, problem = Path(found[name][0]), found[name][1]
        target = store / name
        assert path == target or target in path.parents, (name, path)
        assert problem.startswith("permission denied"), (name, problem)
