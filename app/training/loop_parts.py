"""The pieces the training loop is made of: start-up, data, optimiser, validation, logging."""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel

from app.data.records import (
    PostDataset,
    filter_annotated,
    label_matrix,
    load_records,
    make_collate,
    teacher_matrix,
)
from app.data.scoring import predict
from app.evaluation.metrics import evaluate_scores
from app.model.config import RouterConfig, read_config_file
from app.model.router import Router
from app.model.store import new_router, relocate_config
from app.training.config import TrainConfig


@dataclass(frozen=True)
class TrainingData:
    """One JSONL file, validated, ready for a DataLoader."""

    dataset: PostDataset
    post_ids: list[str]
    labels: np.ndarray  # [N, K] in {-1, 0, 1}
    skipped: int
    has_teacher: bool  # any teacher value at all


def load_training_data(
    path: Path, router: Router, cfg: TrainConfig, *, expert: str | None
) -> TrainingData:
    """Load and check a JSONL file; an expert keeps the samples annotated for its category."""
    categories = router.categories
    loaded = load_records(
        path,
        categories,
        skip_bad=cfg.skip_bad,
        max_images=router.config.backbone.max_images,
        # An expert reads files labelled for every category and keeps its own pipeline's.
        allow_other_categories=expert is not None,
    )
    records = filter_annotated(loaded.records, expert) if expert else list(loaded.records)
    dataset = PostDataset(records, categories)
    ids = [r.record.post_id for r in records]
    has_teacher = bool(np.isfinite(teacher_matrix(records, categories)).any())
    labels = label_matrix(records, categories)
    return TrainingData(dataset, ids, labels, loaded.skipped, has_teacher)


def start_router(cfg: TrainConfig) -> Router:
    """A fresh router (pretrained backbone, new LoRA and heads) from a router.json file.

    Backbone paths are rewritten relative to the output directory, so the saved store
    finds its backbone wherever the config file was.
    """
    source = cfg.model_config_path
    if source.is_dir():
        source = source / "router.json"
    config = read_config_file(source)
    config = relocate_config(config, source.parent, cfg.out)
    updates: dict[str, Any] = {}
    if cfg.categories:
        updates["categories"] = tuple(cfg.categories)
    updates["model_version"] = cfg.model_version or cfg.out.resolve().name
    config = RouterConfig.model_validate(config.model_copy(update=updates).model_dump())
    cfg.out.mkdir(parents=True, exist_ok=True)  # relative paths walk through it
    router = new_router(config, cfg.out)
    if cfg.feature_cache is not None:  # after LoRA wrapping: only a frozen encoder is cached
        router.use_feature_cache(cfg.feature_cache)
    return router


def build_optimizer(router: Router, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: LoRA + extras at `lr`, MLP + heads at `head_lr`."""
    head_ids = {id(p) for p in [*router.mlp.parameters(), *router.heads.parameters()]}
    trainable = [p for p in router.parameters() if p.requires_grad]
    backbone = [p for p in trainable if id(p) not in head_ids]
    heads = [p for p in trainable if id(p) in head_ids]
    groups = [{"params": heads, "lr": cfg.head_lr or cfg.lr}]
    if backbone:
        groups.insert(0, {"params": backbone, "lr": cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def enable_gradient_checkpointing(router: Router) -> None:
    """Recompute activations in the backward pass: memory for time, on every HF submodel."""
    for module in router.base_backbone.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.gradient_checkpointing_enable({"use_reentrant": False})
            module.enable_input_require_grads()


class IndexedDataset(Dataset):
    """Yields (index, item) so a batch knows which samples it holds (shard checks, logs)."""

    def __init__(self, dataset: PostDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class IndexedCollate:
    """The data module's collate (the serving input builder) plus the sample indices."""

    def __init__(self, router: Router) -> None:
        self.collate = make_collate(router)

    def __call__(self, items: Sequence[tuple[int, Any]]) -> dict[str, Any]:
        batch = dict(self.collate([item for _, item in items]))
        batch["ids"] = [index for index, _ in items]
        return batch


def validate(router: Router, data: TrainingData, batch_size: int) -> dict[str, Any]:
    """Per-category PR-AUC, R@P60, APR@R90/95 on the validation set."""
    scores = predict(router, data.dataset, batch_size)
    report = evaluate_scores(data.labels, scores, router.categories)
    return report.to_dict()


class JsonlLog:
    """Append-only JSONL log of steps and validations; a no-op off the main process."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **entry: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(entry, default=str) + "\n")
