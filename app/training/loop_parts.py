"""The pieces the training loop is made of: start-up, data, optimiser, validation, logging."""

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
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
from app.model.store import finetuned_parameters, new_router, relocate_config
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
    finds its backbone wherever the config file was. With `full_finetune` the router has
    no LoRA and its whole backbone (but a frozen image tower) trains.
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
    updates["full_finetune"] = cfg.full_finetune
    if cfg.full_finetune:
        updates["lora"] = None  # the whole backbone trains: no adapter on top
    config = RouterConfig.model_validate(config.model_copy(update=updates).model_dump())
    cfg.out.mkdir(parents=True, exist_ok=True)  # relative paths walk through it
    router = new_router(config, cfg.out)
    set_trainable(router)  # before the cache: it caches a frozen image encoder only
    if cfg.feature_cache is not None:  # after LoRA wrapping: only a frozen encoder is cached
        router.use_feature_cache(cfg.feature_cache)
    return router


def set_trainable(router: Router) -> None:
    """Which backbone weights train: those the store will save, no more.

    LoRA: peft has frozen the base weights already. Full fine-tune: exactly the parameters
    the store saves in `backbone.safetensors` (`finetuned_parameters`: all but a frozen image
    tower). Neither (`lora` null): the base weights are frozen, since the store would not
    save them and the trained backbone would be lost. The extras always train.
    """
    if router.config.lora is not None:
        return
    backbone = router.base_backbone
    trained = finetuned_parameters(backbone) if router.config.full_finetune else {}
    trained_ids = {id(p) for p in trained.values()} | {id(p) for p in backbone.extras.values()}
    for param in backbone.parameters():
        param.requires_grad_(id(param) in trained_ids)


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


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of posts of similar text length, in random order: less padding per batch.

    Most posts are short and a batch pads to its longest, so random batches spend much of
    their compute on padding. Each epoch: shuffle every index, cut the order into buckets of
    `bucket_batches × batch_size`, sort each bucket by length (ties stay in shuffled order),
    cut it into batches and shuffle the batches. Buckets keep randomness in which posts meet
    in a batch; one global sort would batch the same posts together every epoch.

    Every batch is full but the last one, which stays last: the shape of a plain
    `BatchSampler`'s output, so accelerate's `BatchSamplerShard` gives each rank its own
    batches and the same number of them, as it does without buckets. The order is a function
    of `(seed, epoch)` alone, never of RNG state, so that every rank draws the same batches
    and a resumed run (`set_epoch`, then skip the batches done) sees the uninterrupted order.
    """

    drop_last = False  # read by accelerate's BatchSamplerShard

    def __init__(
        self, lengths: Sequence[int], batch_size: int, *, seed: int, bucket_batches: int = 50
    ) -> None:
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError("batch_size and bucket_batches must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.bucket_size = bucket_batches * batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order `__iter__` yields (the trainer calls it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        batches: list[list[int]] = []
        for start in range(0, len(order), self.bucket_size):
            bucket = order[start : start + self.bucket_size]
            bucket = bucket[np.argsort(self.lengths[bucket], kind="stable")]
            for first in range(0, len(bucket), self.batch_size):
                batches.append(bucket[first : first + self.batch_size].tolist())
        # Buckets are whole batches, so only the very last batch can be short.
        short = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        for index in rng.permutation(len(batches)):
            yield batches[index]
        if short is not None:
            yield short


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


def selection_value(report: dict[str, Any], metric: str) -> float | None:
    """The average of `metric` in a `validate` report; None when no category defines it."""
    value = report.get("averages", {}).get(metric)
    return None if value is None or math.isnan(value) else float(value)


def trainable_weights(router: Router) -> dict[str, torch.Tensor]:
    """A CPU copy of every trainable parameter: all that training changes, hence all that
    keeping the best validation's weights needs (base weights and buffers never change)."""
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in router.named_parameters()
        if param.requires_grad
    }


def restore_weights(router: Router, weights: dict[str, torch.Tensor]) -> None:
    """Put `trainable_weights` back into `router` (same names, in place, on its device)."""
    params = dict(router.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"weights for parameters the router does not have: {unknown[:8]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


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
