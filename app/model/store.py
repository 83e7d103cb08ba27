"""The model store: `model_store/<name>/` holds everything needed to load one router offline.

Layout (DESIGN.md):
    router.json            RouterConfig: categories, backbone family and local path(s),
                           pooling, text/image limits, LoRA settings, model_version
    adapter/               the LoRA adapter in peft's own format (absent when `lora` is null)
    head.safetensors       MLP, heads and the backbone's extras (e.g. the "no image" embedding)
    backbone.safetensors   only when router.json says `"full_finetune": true`: every backbone
                           weight the fine-tune trained (`finetuned_parameters`), loaded over
                           the pretrained weights at `backbone.path`
    backbone/              optional: a backbone shipped with the router (the tiny test model)
    lexical.json           only when router.json says `"lexical_head": true`: the n-gram
    lexical.safetensors    model blended with the router's logits (app/model/lexical.py)
    text_encoder.int8.onnx only when router.json has `quantization` (`radar quantize`): the int8
                           text encoder run instead of the pretrained one (app/model/quantize.py)
"""

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.model.backbones import Backbone, load_backbone
from app.model.config import (
    CONFIG_FILE,
    PACKAGE_PREFIX,
    RouterConfig,
    read_config,
    resolve_path,
)
from app.model.errors import ModelStoreError
from app.model.files import is_dir, is_file
from app.model.lexical import LEXICAL_CONFIG, LEXICAL_WEIGHTS, load_lexical_head
from app.model.router import Router, wrap_with_lora

# Loading must never reach a model hub: every path is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BACKBONE_FILE = "backbone.safetensors"
# Backbone submodules a full fine-tune leaves frozen: the image towers, which LoRA never
# targets either. Their features stay a function of the pixels alone (what the image-feature
# cache relies on), the dual encoder's BatchNorm statistics (always in eval mode) stay the
# pretrained ones, and the store need not carry an unchanged copy of them.
FULL_FINETUNE_FROZEN: dict[str, tuple[str, ...]] = {
    "dual_encoder": ("image_encoder",),
    "qwen3_vl": ("model.visual",),
}


def write_config(config: RouterConfig, store_dir: Path) -> None:
    data = config.model_dump(mode="json")
    if not config.full_finetune:
        # Written only when true, so that a LoRA store stays readable by older code.
        del data["full_finetune"]
    if not config.lexical_head:
        del data["lexical_head"]
    if config.quantization is None:
        del data["quantization"]
    path = Path(store_dir) / CONFIG_FILE
    path.write_text(json.dumps(data, indent=2) + "\n")


def relocate_config(config: RouterConfig, from_dir: Path, to_dir: Path) -> RouterConfig:
    """The same config with relative backbone paths rewritten to work from `to_dir`."""
    backbone = config.backbone
    paths = {"path": _relocate(backbone.path, from_dir, to_dir)}
    if backbone.image_path is not None:
        paths["image_path"] = _relocate(backbone.image_path, from_dir, to_dir)
    return config.model_copy(update={"backbone": backbone.model_copy(update=paths)})


def _relocate(reference: str, from_dir: Path, to_dir: Path) -> str:
    if reference.startswith(PACKAGE_PREFIX) or Path(reference).is_absolute():
        return reference
    absolute = resolve_path(reference, from_dir).resolve()
    return os.path.relpath(absolute, Path(to_dir).resolve())


def copy_router(source: Path | str, target: Path | str, extra_files: tuple[str, ...] = ()) -> Path:
    """Copy a saved router (config, adapter, head, plus `extra_files`) to `target`."""
    source, target = Path(source), Path(target)
    config = read_config(source)
    target.mkdir(parents=True, exist_ok=True)
    write_config(relocate_config(config, source, target), target)
    files = (HEAD_FILE, BACKBONE_FILE, LEXICAL_CONFIG, LEXICAL_WEIGHTS, *extra_files)
    if config.quantization is not None:
        files += (config.quantization.text_encoder,)
    for name in files:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    if (source / ADAPTER_DIR).is_dir():
        shutil.copytree(source / ADAPTER_DIR, target / ADAPTER_DIR, dirs_exist_ok=True)
    return target


def head_state(router: Router) -> dict[str, torch.Tensor]:
    """The full-parameter part of a router: MLP, heads and backbone extras."""
    state = {f"mlp.{k}": v for k, v in router.mlp.state_dict().items()}
    state |= {f"heads.{k}": v for k, v in router.heads.state_dict().items()}
    state |= {f"extras.{k}": v for k, v in router.base_backbone.extras.items()}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def finetuned_parameters(backbone: Backbone) -> dict[str, torch.nn.Parameter]:
    """The backbone parameters a full fine-tune trains and `backbone.safetensors` holds.

    All of them but the extras (saved with the heads) and the family's frozen image tower
    (`FULL_FINETUNE_FROZEN`). One rule for the trainer, which makes exactly these trainable,
    and for the store, which saves and expects exactly these names.
    """
    frozen = FULL_FINETUNE_FROZEN.get(backbone.config.family, ())
    return {
        name: param
        for name, param in backbone.named_parameters()
        if not name.startswith("extras.")
        and not any(name == f or name.startswith(f + ".") for f in frozen)
    }


def save_router(router: Router, store_dir: Path | str) -> Path:
    """Write `router` in the model-store layout; returns the directory."""
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    write_config(router.config, store_dir)
    if isinstance(router.backbone, PeftModel):
        router.backbone.save_pretrained(str(store_dir / ADAPTER_DIR))
    if router.config.full_finetune:
        weights = finetuned_parameters(router.base_backbone).items()
        state = {k: v.detach().contiguous().cpu() for k, v in weights}
        save_file(state, str(store_dir / BACKBONE_FILE))
    save_file(head_state(router), str(store_dir / HEAD_FILE))
    if router.config.lexical_head:
        if router.lexical is None:
            raise ValueError("router.json says lexical_head but the router has none")
        router.lexical.save(store_dir)
    return store_dir


def new_router(config: RouterConfig, store_dir: Path | str) -> Router:
    """A router with pretrained backbone, fresh LoRA adapters and freshly initialised heads."""
    backbone = load_backbone(config.backbone, Path(store_dir))
    wrapped = wrap_with_lora(backbone, config.lora) if config.lora else backbone
    return Router(config, wrapped)


def load_router(
    store_dir: Path | str, device: torch.device | str = "cpu", *, trainable: bool = False
) -> Router:
    """Load a saved router, offline; `ModelStoreError` names any missing or broken file."""
    store_dir = Path(store_dir)
    if not is_dir(store_dir):
        raise ModelStoreError(store_dir, "model-store directory does not exist")
    config = read_config(store_dir)
    backbone = load_backbone(config.backbone, store_dir)
    if config.quantization is not None:
        from app.model.quantize import load_quantized_text_encoder  # onnxruntime: only here

        if trainable or torch.device(device).type != "cpu":
            raise ModelStoreError(store_dir, "an int8 router only scores, on the CPU")
        load_quantized_text_encoder(backbone, store_dir, config.quantization)
        backbone.requires_grad_(False)
    if config.lora is not None:
        backbone = _load_adapter(backbone, store_dir / ADAPTER_DIR, trainable=trainable)
    if config.full_finetune:
        _load_finetuned_backbone(backbone, store_dir / BACKBONE_FILE)
        if not trainable:
            # Loaded to score, not to train (what PEFT does for a LoRA store): with its
            # weights left trainable the image encoder refused the feature cache, and
            # evaluate / calibrate re-encoded every image of a full fine-tune.
            backbone.requires_grad_(False)
    router = Router(config, backbone)
    _load_head(router, store_dir / HEAD_FILE)
    if config.lexical_head:
        router.lexical = load_lexical_head(store_dir, config.categories)
    router.place(device)
    router.train(trainable)
    return router


def _load_adapter(backbone: torch.nn.Module, adapter_dir: Path, *, trainable: bool) -> PeftModel:
    for name in ADAPTER_FILES:
        if not is_file(adapter_dir / name):
            raise ModelStoreError(adapter_dir / name, "missing (router.json asks for LoRA)")
    try:
        wrapped = PeftModel.from_pretrained(backbone, str(adapter_dir), is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as exc:
        raise ModelStoreError(adapter_dir, f"cannot load the LoRA adapter: {exc}") from None
    if trainable:
        for param in wrapped.get_base_model().extras.values():
            param.requires_grad_(True)
    return wrapped


def _load_finetuned_backbone(backbone: Backbone, path: Path) -> None:
    """Load a full fine-tune's backbone weights over the pretrained ones, names checked."""
    expected = finetuned_parameters(backbone)
    saved = _read_matching(path, expected, "router.json says full_finetune", "the backbone")
    with torch.no_grad():
        for name, tensor in saved.items():
            expected[name].copy_(tensor)


def _load_head(router: Router, path: Path) -> None:
    saved = _read_matching(path, head_state(router), "MLP and heads", "router.json")
    with torch.no_grad():
        router.mlp.load_state_dict(_strip(saved, "mlp."))
        router.heads.load_state_dict(_strip(saved, "heads."))
        for name, value in _strip(saved, "extras.").items():
            router.base_backbone.extras[name].copy_(value)


def _read_matching(
    path: Path, expected: Mapping[str, torch.Tensor], what: str, against: str
) -> dict[str, torch.Tensor]:
    """A safetensors file whose tensor names and shapes are exactly `expected`'s, or a
    `ModelStoreError` naming the file and the first differences."""
    if not is_file(path):
        raise ModelStoreError(path, f"missing ({what})")
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelStoreError(path, f"not a readable safetensors file: {exc}") from None
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ModelStoreError(
            path,
            f"tensors do not match {against}: missing {missing[:8]}, unexpected {unexpected[:8]}",
        )
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            raise ModelStoreError(
                path,
                f"{key} has shape {tuple(tensor.shape)}, {against} implies "
                f"{tuple(expected[key].shape)}",
            )
    return saved


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
