"""`radar evaluate`: score a labelled JSONL file with a saved router and measure it.

Scoring (the slow part) and measuring are separate so that callers holding scores already
(the proxy benchmark, `radar calibrate`) reuse the rest:

    scored = score_data(model_dir, data)          # router forward over every post
    result = evaluate_scored(scored, thresholds)  # DESIGN.md's metrics (+ a thresholds check)
    result = evaluate_model(model_dir, data)      # both at once

Every metric of a category is computed on that category's own annotated samples (label
-1 = not annotated is excluded), by `app.evaluation.metrics`. With thresholds, the check
reports what those taus do on this data: the recall realised per category (with a bootstrap
95 % interval), the auto-pass rate per category, and the overall auto-pass rate (the share of
all posts dispatched to no category, what the service's `radar_auto_pass_total` counts).
"""

import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.data.records import PostDataset, fingerprint, label_matrix, load_records
from app.data.scoring import predict
from app.data.sharding import Shard, ShardDone, current_shard
from app.evaluation.metrics import (
    RECALL_TARGETS,
    EvaluationReport,
    bootstrap_recall_ci,
    evaluate_scores,
    overall_auto_pass_rate,
)
from app.model.config import read_config
from app.model.store import load_router
from app.thresholds import load_thresholds


@dataclass(frozen=True)
class ScoredData:
    """A labelled JSONL file scored by one router: labels and scores `[N, K]` in model order."""

    model_dir: Path
    model_version: str
    categories: tuple[str, ...]
    data: Path
    data_fingerprint: str
    post_ids: tuple[str, ...]
    labels: np.ndarray  # [N, K] in {-1, 0, 1}
    scores: np.ndarray  # [N, K] probabilities (float64 copies of the router's float32)
    ignored_categories: tuple[str, ...]  # labelled in the data, unknown to the model


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when present (the router then runs in bf16), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def score_data(
    model_dir: Path | str,
    data: Path | str,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
    shard: Shard | None = None,
    feature_cache: Path | str | None = None,
) -> ScoredData:
    """Load the router and score every post of `data` (raises `DataError`/`ModelStoreError`).

    Labels of categories the model does not have are allowed and ignored (an expert is
    evaluated on a file labelled for every category) but listed in `ignored_categories`, so
    a misspelt category is visible in the report instead of silently unmeasured.

    Under `accelerate launch` (`shard` None reads the launch; `app.data.sharding`) every
    process scores its slice of whole batches and the main process gets all the scores, in
    input order, equal to one process's. Every other process then ends (`ShardDone`, exit
    status 0), so that whatever the caller does next with the scores (a report, a thresholds
    file) happens once, on the main process: `evaluate` and `calibrate` shard without a
    change of theirs.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
    shard = current_shard() if shard is None else shard
    model_dir, data = Path(model_dir), Path(data)
    router = load_router(model_dir, shard.device(resolve_device(device)))
    router.use_feature_cache(feature_cache)  # frozen image features (no-op for other backbones)
    categories = router.categories
    loaded = load_records(
        data, categories, max_images=router.config.backbone.max_images, allow_other_categories=True
    )
    labelled = {name for item in loaded for name in item.record.labels}
    dataset = PostDataset(loaded.records, categories)
    scores = predict(router, dataset, batch_size, progress, shard=shard)
    if not shard.is_main:
        raise ShardDone(shard.rank)
    return ScoredData(
        model_dir=model_dir,
        model_version=router.config.model_version,
        categories=categories,
        data=data,
        data_fingerprint=fingerprint([data]),
        post_ids=tuple(item.record.post_id for item in loaded),
        labels=label_matrix(loaded.records, categories),
        scores=scores.astype(np.float64),
        ignored_categories=tuple(sorted(labelled - set(categories))),
    )


@dataclass(frozen=True)
class CategoryCheck:
    """What one category's tau does on this data (NaN where the category has no positive)."""

    category: str
    tau: float  # dispatch iff p > tau
    n_annotated: int
    n_positive: int
    recall: float  # of `p > tau` on the annotated samples
    recall_low: float  # bootstrap percentile 95 % interval
    recall_high: float
    auto_pass_rate: float  # share of the annotated samples with p <= tau (the APR definition)
    pass_share_all: float  # share of all posts with p <= tau (the service's per-category rate)


@dataclass(frozen=True)
class ThresholdsCheck:
    """A set of taus applied to the scored data."""

    version: str
    source: str
    categories: dict[str, CategoryCheck]
    overall_auto_pass_rate: float  # share of all posts dispatched to no category


def check_thresholds(
    labels: np.ndarray,
    scores: np.ndarray,
    categories: Sequence[str],
    taus: Mapping[str, float],
    *,
    version: str = "-",
    source: str = "-",
    n_boot: int = 1000,
    seed: int = 0,
) -> ThresholdsCheck:
    """Realised recall (bootstrap 95 % CI) and auto-pass rates of `taus` on these scores."""
    missing = [name for name in categories if name not in taus]
    if missing:
        raise ValueError(f"thresholds lack categories {missing}")
    per: dict[str, CategoryCheck] = {}
    for k, name in enumerate(categories):
        y, s, tau = labels[:, k], scores[:, k], float(taus[name])
        annotated = s[y != -1]
        ci = bootstrap_recall_ci(y, s, tau, n_boot=n_boot, seed=seed)
        per[name] = CategoryCheck(
            category=name,
            tau=tau,
            n_annotated=int(annotated.size),
            n_positive=int(np.sum(y == 1)),
            recall=ci.recall,
            recall_low=ci.low,
            recall_high=ci.high,
            auto_pass_rate=float(np.mean(annotated <= tau)) if annotated.size else math.nan,
            pass_share_all=float(np.mean(s <= tau)) if s.size else math.nan,
        )
    overall = overall_auto_pass_rate(scores, [float(taus[name]) for name in categories])
    return ThresholdsCheck(version, source, per, overall)


@dataclass(frozen=True)
class ModelEvaluation:
    """Everything `radar evaluate` reports; `to_dict()` is the JSON report."""

    scored: ScoredData
    metrics: EvaluationReport
    # A perfect ranker's APR@R90/R95 per category ({"apr_r90": .., "apr_r95": ..}), and
    # their mean over the categories with defined metrics.
    oracle: dict[str, dict[str, float]]
    oracle_average: dict[str, float]
    thresholds: ThresholdsCheck | None
    date: str  # UTC ISO 8601
    command: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: NaN → None, ±inf → the strings "inf"/"-inf" (strict JSON has no inf)."""
        scored = self.scored
        document = {
            "model_dir": str(scored.model_dir),
            "model_version": scored.model_version,
            "data": str(scored.data),
            "data_fingerprint": scored.data_fingerprint,
            "date": self.date,
            "command": self.command,
            "n_posts": len(scored.post_ids),
            "categories": list(scored.categories),
            "ignored_categories": list(scored.ignored_categories),
            "metrics": self.metrics.to_dict(),
            "oracle": self.oracle,
            "oracle_average": self.oracle_average,
            "thresholds": None,
        }
        if self.thresholds is not None:
            check = self.thresholds
            document["thresholds"] = {
                "version": check.version,
                "source": check.source,
                "overall_auto_pass_rate": check.overall_auto_pass_rate,
                "categories": {k: asdict(v) for k, v in check.categories.items()},
            }
        return json_safe(document)


def oracle_apr_at(n_annotated: int, n_positive: int, recall: float) -> float:
    """APR@R of a perfect ranker: it dispatches only the ⌈R·P⌉ positives it must.

    The ceiling a router can reach at recall R; at R = 1 it is the share of annotated
    negatives (the metrics' `oracle_apr`). Below 1 it also passes the positives R lets go,
    so the share of negatives alone is not a ceiling there. NaN without a positive.
    """
    if n_positive == 0:
        return math.nan
    dispatched = math.ceil(recall * n_positive - 1e-9)  # 0.07 * 100 is 7.000000000000001
    return (n_annotated - dispatched) / n_annotated


def oracle_table(
    metrics: EvaluationReport,
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """`oracle_apr_at` for R90 and R95 per category, and their mean over defined ones."""
    keys = {f"apr_r{round(r * 100)}": r for r in RECALL_TARGETS}
    table = {
        name: {key: oracle_apr_at(m.n_annotated, m.n_positive, r) for key, r in keys.items()}
        for name, m in metrics.categories.items()
    }
    defined = [table[name] for name, m in metrics.categories.items() if m.defined]
    average = {
        key: float(np.mean([row[key] for row in defined])) if defined else math.nan for key in keys
    }
    return table, average


def json_safe(value: Any) -> Any:
    """Recursively replace NaN by None and ±inf by "inf"/"-inf"."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second: `2025-01-31T12:00:00Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_command() -> str:
    """This process's command line, shell-quoted (provenance for reports and thresholds)."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def evaluate_scored(
    scored: ScoredData,
    thresholds: Path | str | Mapping[str, float] | None = None,
    *,
    command: str | None = None,
    n_boot: int = 1000,
) -> ModelEvaluation:
    """DESIGN.md's metrics on already-scored data; `thresholds` a YAML file or {category: tau}.

    A thresholds file is validated for this model (categories, model_version) exactly as
    the service validates it, so a file the service would refuse is refused here too
    (`ThresholdsError`).
    """
    metrics = evaluate_scores(scored.labels, scored.scores, scored.categories)
    oracle, oracle_average = oracle_table(metrics)
    check = None
    if thresholds is not None:
        if isinstance(thresholds, Mapping):
            version, source, taus = "-", "<given taus>", dict(thresholds)
        else:
            active = load_thresholds(Path(thresholds), scored.categories, scored.model_version)
            version, source, taus = active.version, str(thresholds), active.taus
        check = check_thresholds(
            scored.labels,
            scored.scores,
            scored.categories,
            taus,
            version=version,
            source=source,
            n_boot=n_boot,
        )
    return ModelEvaluation(
        scored=scored,
        metrics=metrics,
        oracle=oracle,
        oracle_average=oracle_average,
        thresholds=check,
        date=now_iso(),
        command=command if command is not None else default_command(),
    )


def evaluate_model(
    model_dir: Path | str,
    data: Path | str,
    *,
    thresholds: Path | str | Mapping[str, float] | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
    command: str | None = None,
    n_boot: int = 1000,
    feature_cache: Path | str | None = None,
) -> ModelEvaluation:
    """Score `data` with the router in `model_dir` and measure it (see `evaluate_scored`)."""
    if thresholds is not None and not isinstance(thresholds, Mapping):
        # Refuse a bad file before the (slow) scoring pass, not after it.
        config = read_config(Path(model_dir))
        load_thresholds(Path(thresholds), config.categories, config.model_version)
    scored = score_data(
        model_dir,
        data,
        batch_size=batch_size,
        device=device,
        progress=progress,
        feature_cache=feature_cache,
    )
    return evaluate_scored(scored, thresholds, command=command, n_boot=n_boot)
