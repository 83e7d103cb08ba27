"""The proxy benchmark: the paper's Table 2 rows and λ sweep, rebuilt on public data.

One command, from scratch (data build → experts → teacher scores → routers → evaluation →
calibration → docs/results.md):

    python -m experiments.proxy.benchmark --out runs/proxy

Rows, all on the MiniLM + EfficientNet-Lite0 dual encoder (real weights): the per-category
experts (K = 1 each, on their own pipeline's samples), "BCE w/o mask", masked BCE (λ = 0),
masked BCE + distillation (λ = 0.5, teachers = the experts), and λ ∈ {0.25, 0.75, 1}; then
the shipped router: λ = 0.5 with a lexical head (`app.training.lexical`: per-category n-gram
models blended in with weights picked on validation), whose thresholds are calibrated.
Two baselines on the same test split: per-category TF-IDF + logistic regression
(`experiments.proxy.baselines`) and the previously shipped router (`--previous-router`,
copied into the work directory first, so `--ship` cannot overwrite it before it is scored).
Every ordering claim gets a paired-bootstrap interval over the test posts.
"""

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.data.records import fingerprint
from app.evaluation.bootstrap import PairedBootstrap
from app.evaluation.evaluate import ScoredData, score_data
from app.model.config import read_config
from app.model.store import copy_router
from app.training.config import TrainConfig
from app.training.lexical import add_lexical_head
from app.training.teach import teach
from app.training.trainer import CONFIG_FILE, train
from experiments.proxy.baselines import TFIDF, ScoreMatrix, router_scores, tfidf_scores
from experiments.proxy.data import build_proxy_dataset
from experiments.proxy.results import (
    PREVIOUS,
    SHIPPED,
    ThresholdCheck,
    calibrate_and_check,
    ordering_bootstraps,
    write_results,
)

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The λ sweep's side points: with `--sweep-max-posts` they train on a documented subset, while
# the main rows (no mask, λ = 0, λ = 0.5) and the shipped router train on everything.
SWEEP_ONLY = (0.25, 0.75, 1.0)
# The memes (smear) have ~700 training posts: one epoch is too few steps for their expert.
EXPERT_EPOCHS = {"smear": 3}


@dataclass
class Benchmark:
    """Settings of one run and what it measured."""

    out: Path
    shared: Path
    model_config: Path
    seed: int
    max_per_source: int
    epochs: int
    batch_size: int
    lr: float
    head_lr: float
    previous_router: Path | None = None  # the router shipped before this run, if any
    full_finetune: bool = False  # every weight of the text encoder trained, not LoRA
    sweep_max_posts: int = 0  # λ ∈ SWEEP_ONLY trained on the first N posts (0: all)
    reuse: bool = True  # keep a training run whose output matches (see `finished_run`)
    data_dir: Path | None = None  # where the splits are built (default: <out>/data)
    command: str = "python -m experiments.proxy.benchmark --out runs/proxy --ship"
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, float | None] = field(default_factory=dict)  # stage → its own time
    # Reused runs older than the `seconds` record: steps × batch / their recorded samples/s,
    # the training loop's time without its validations.
    estimated: dict[str, float] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: dict[str, ThresholdCheck] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, ScoreMatrix] = field(default_factory=dict)  # test scores per row
    orderings: dict[str, PairedBootstrap] = field(default_factory=dict)  # per ordering claim
    blend_weights: dict[str, float] = field(default_factory=dict)  # the lexical head's w

    def timed(self, name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        self.timings[name] = round(time.perf_counter() - started, 1)
        print(f"[{name}] {self.timings[name]:.0f} s", flush=True)
        return result

    @property
    def data(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.out / "data"

    def train_config(self, data: Path, out: Path, **extra: Any) -> TrainConfig:
        return TrainConfig(
            data=data,
            val=self.data / "val.jsonl",
            model_config_path=self.model_config,
            out=out,
            epochs=extra.pop("epochs", self.epochs),
            batch_size=self.batch_size,
            lr=self.lr,
            head_lr=self.head_lr,
            seed=self.seed,
            log_every=20,
            feature_cache=self.feature_cache,
            full_finetune=self.full_finetune,
            progress=False,
            **extra,
        )

    def train_stage(self, name: str, cfg: TrainConfig) -> None:
        """Train as `cfg` says, or keep a finished run of the same settings and data."""
        if self.reuse and (found := finished_run(cfg)) is not None:
            self.reused[name] = found.get("seconds")
            if self.reused[name] is None and (estimate := _seconds_from_rate(found)):
                self.estimated[name] = estimate
            took = self.reused[name]
            when = f"{took:.0f} s" if took else "time not recorded"
            print(f"[{name}] reused {cfg.out} ({when})", flush=True)
            return
        self.timed(name, lambda: train(cfg))

    @property
    def feature_cache(self) -> Path:
        """One cache of frozen image features for every stage: each image is encoded once
        per image encoder in the whole run (experts, teach, routers, evaluate, calibrate)."""
        return self.out / "feature-cache"


# Settings that change what a training run computes; the rest (paths, logging, progress, the
# feature cache: cached and fresh features are the same floats) does not.
# `model_version` is a label written into router.json, not part of the computation.
_NOT_COMPARED = {
    "data",
    "val",
    "out",
    "feature_cache",
    "progress",
    "log_every",
    "resume",
    "model_version",
}


def finished_run(cfg: TrainConfig) -> dict[str, Any] | None:
    """The provenance of a finished run in `cfg.out` with the same settings and the same data
    and validation bytes (fingerprints), or None: then the stage trains afresh."""
    saved_path = cfg.out / CONFIG_FILE
    if not saved_path.is_file() or not (cfg.out / "router.json").is_file():
        return None
    saved = json.loads(saved_path.read_text())
    wanted = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_COMPARED}
    kept = {k: v for k, v in saved.get("config", {}).items() if k not in _NOT_COMPARED}
    # No categories given means the model config's (`radar train` without --categories).
    defaults = list(read_config(cfg.out).categories)
    for settings in (wanted, kept):
        settings["categories"] = list(settings.get("categories") or defaults)
    if kept != wanted or saved.get("data_fingerprint") != fingerprint([cfg.data]):
        return None
    if cfg.val is not None and saved.get("val_fingerprint") != fingerprint([cfg.val]):
        return None
    return saved


def _seconds_from_rate(saved: dict[str, Any]) -> float | None:
    """A finished run's training time from its recorded throughput, or None."""
    rate, steps = saved.get("samples_per_s"), saved.get("steps")
    config = saved.get("config", {})
    if not rate or not steps or "batch_size" not in config:
        return None
    return round(steps * config["batch_size"] * config.get("grad_accum", 1) / rate, 1)


def run(bench: Benchmark) -> None:
    """Every stage in order; the measurements land in `bench`."""
    previous = _keep_previous_router(bench)
    data = bench.data
    manifest = bench.timed(
        "data",
        lambda: build_proxy_dataset(
            bench.shared, data, seed=bench.seed, max_per_source=bench.max_per_source or None
        ),
    )
    bench.manifest = manifest.model_dump(mode="json")
    categories = tuple(manifest.categories)
    experts = [bench.out / f"expert-{c}" for c in categories]
    for category, directory in zip(categories, experts, strict=True):
        bench.train_stage(
            f"expert {category}",
            bench.train_config(
                data / "train.jsonl",
                directory,
                categories=(category,),
                lam=0.0,
                model_version=f"expert-{category}",
                epochs=EXPERT_EPOCHS.get(category, bench.epochs),
            ),
        )
    taught = data / "train.teach.jsonl"
    bench.timed(
        "teach",
        lambda: teach(
            experts,
            data / "train.jsonl",
            taught,
            progress=False,
            feature_cache=bench.feature_cache,
        ),
    )
    routers = {"BCE w/o mask": bench.out / "router-nomask"}
    routers |= {f"λ={lam:g}": bench.out / f"router-lambda{lam:g}" for lam in LAMBDAS}
    for name, directory in routers.items():
        lam = 0.0 if name == "BCE w/o mask" else float(name[2:])
        source = taught if lam > 0 else data / "train.jsonl"
        if lam in SWEEP_ONLY and bench.sweep_max_posts:
            source = _first_posts(taught, bench.sweep_max_posts)
        bench.train_stage(
            f"train {name}",
            bench.train_config(
                source,
                directory,
                lam=lam,
                use_mask=name != "BCE w/o mask",
                categories=categories,
                model_version=f"proxy-{directory.name}",
            ),
        )
    shipped = bench.out / "router-lexical"
    bench.blend_weights = bench.timed(
        "lexical head",
        lambda: (
            add_lexical_head(
                routers["λ=0.5"],
                data / "train.jsonl",
                data / "val.jsonl",
                shipped,
                batch_size=bench.batch_size,
                progress=False,
                feature_cache=bench.feature_cache,
            ).weights
        ),
    )
    routers[SHIPPED] = shipped
    test = data / "test.jsonl"
    bench.scores["experts"] = bench.timed(
        "evaluate experts",
        lambda: _evaluate_experts(experts, test, categories, bench.batch_size, bench.feature_cache),
    )
    scored: dict[str, ScoredData] = {}
    for name, directory in routers.items():
        scored[name] = bench.timed(
            f"evaluate {name}",
            lambda d=directory: score_data(
                d, test, batch_size=bench.batch_size, feature_cache=bench.feature_cache
            ),
        )
        bench.scores[name] = ScoreMatrix.from_scored(name, scored[name])
    bench.scores[TFIDF] = bench.timed(
        "TF-IDF baseline", lambda: tfidf_scores(data / "train.jsonl", test, categories)[0]
    )
    if previous is not None:
        bench.scores[PREVIOUS] = bench.timed(
            "evaluate previous router",
            lambda: router_scores(
                previous,
                test,
                name=PREVIOUS,
                batch_size=bench.batch_size,
                feature_cache=bench.feature_cache,
            ),
        )
    for name, matrix in bench.scores.items():
        bench.reports[name] = matrix.report().to_dict()
    for recall in (0.90, 0.95):
        bench.thresholds[f"{recall:.2f}"] = bench.timed(
            f"calibrate R={recall}",
            lambda r=recall: calibrate_and_check(
                shipped,
                data / "val.jsonl",
                scored[SHIPPED],
                r,
                bench.out,
                bench.batch_size,
                seed=bench.seed,
                feature_cache=bench.feature_cache,
            ),
        )
    bench.orderings = bench.timed(
        "paired bootstrap", lambda: ordering_bootstraps(bench.scores, seed=bench.seed)
    )


def _first_posts(path: Path, n: int) -> Path:
    """The first `n` lines of `path` (the splits are shuffled already), written beside it."""
    subset = path.with_name(f"{path.stem}.first{n}.jsonl")
    with path.open("rb") as source:
        lines = [line for _, line in zip(range(n), source, strict=False)]
    if not subset.is_file() or subset.read_bytes() != b"".join(lines):
        subset.write_bytes(b"".join(lines))
    return subset


def _keep_previous_router(bench: Benchmark) -> Path | None:
    """Copy the previous router into the work directory before anything can replace it.

    `--ship` overwrites model_store/proxy at the end of the run; the copy is what is scored,
    and it stays next to the run's other routers for a later look.
    """
    if bench.previous_router is None:
        return None
    copy = bench.out / "previous-router"
    if copy.resolve() != bench.previous_router.resolve():
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(bench.previous_router, copy)
    return copy


def _evaluate_experts(
    experts: list[Path],
    data: Path,
    categories: tuple[str, ...],
    batch_size: int,
    feature_cache: Path | None = None,
) -> ScoreMatrix:
    """Each expert scores the test posts annotated for its own category, the only ones its
    column is judged on; the others get 0 there, which no metric reads (label -1).

    A tenth of the test split for `toxic` or `smear`: scoring every post with every expert
    took 374 s of the whole-corpus run, almost all of it on posts no metric looked at.
    """
    lines = [line for line in data.read_bytes().splitlines(keepends=True) if line.strip()]
    order = {json.loads(line)["post_id"]: i for i, line in enumerate(lines)}
    labels = np.full((len(lines), len(categories)), -1, dtype=np.int64)
    scores = np.zeros((len(lines), len(categories)))
    for k, (category, expert) in enumerate(zip(categories, experts, strict=True)):
        own = [line for line in lines if json.loads(line)["labels"].get(category, -1) != -1]
        # Beside the split, so that its relative image paths resolve the same.
        subset = data.with_name(f"{data.stem}.{category}.jsonl")
        if not subset.is_file() or subset.read_bytes() != b"".join(own):
            subset.write_bytes(b"".join(own))
        scored = score_data(expert, subset, batch_size=batch_size, feature_cache=feature_cache)
        rows = [order[post_id] for post_id in scored.post_ids]
        labels[rows, k] = scored.labels[:, 0]
        scores[rows, k] = scored.scores[:, 0]
    post_ids = tuple(json.loads(line)["post_id"] for line in lines)
    return ScoreMatrix("experts", categories, post_ids, labels, scores)


def ship(bench: Benchmark, model_store: Path, thresholds: Path) -> None:
    """Copy the shipped router (λ = 0.5 + lexical head) and its R = 0.90 thresholds."""
    if model_store.exists():
        shutil.rmtree(model_store)
    copy_router(bench.out / "router-lexical", model_store, extra_files=("lexical_fit.json",))
    for name in ("training_config.json", "train_log.jsonl"):  # the neural part's provenance
        shutil.copyfile(bench.out / "router-lambda0.5" / name, model_store / name)
    shutil.copyfile(bench.thresholds["0.90"].path, thresholds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/proxy"), help="work directory")
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path("../shared/data"),
        help="the public datasets (default ../shared/data)",
    )
    parser.add_argument(
        "--model-config",
        type=Path,
        default=Path("configs/dual_minilm_effnetlite0.json"),
        help="backbone config (default: MiniLM + EfficientNet-Lite0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed (0)")
    parser.add_argument(
        "--max-per-source",
        type=int,
        default=500,
        help="posts kept per source dataset before splitting (500; 0: every post)",
    )
    parser.add_argument(
        "--epochs", type=int, default=1, help="epochs per training run (1; smear's expert: 3)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (16)")
    parser.add_argument(
        "--full-finetune",
        action="store_true",
        help="train every weight of the text encoder instead of a LoRA adapter (experts and "
        "routers); its default lrs are 5e-5 and 1e-3",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="backbone lr (LoRA: 5e-4, the paper's 1e-5 is for 800k samples, ours are ~4k; "
        "--full-finetune: 5e-5)",
    )
    parser.add_argument(
        "--head-lr", type=float, default=None, help="MLP + heads lr (1e-2; --full-finetune: 1e-3)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="where the splits are built (default <out>/data); e.g. an existing "
        "`experiments.proxy.data` output, so that runs trained on it are reused",
    )
    parser.add_argument(
        "--sweep-max-posts",
        type=int,
        default=0,
        help="train λ = 0.25, 0.75, 1 on the first N training posts (0: all); the main rows "
        "and the shipped router always train on everything",
    )
    parser.add_argument(
        "--no-reuse",
        action="store_true",
        help="train every stage afresh (default: keep a finished run in the work directory "
        "whose settings and data fingerprints match)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("docs/results.md"),
        help="where the results document goes",
    )
    parser.add_argument(
        "--previous-router",
        type=Path,
        default=Path("model_store/proxy") if Path("model_store/proxy").is_dir() else None,
        help="the router to compare against, scored on the same test split "
        "(default model_store/proxy if it exists; copied aside before --ship replaces it)",
    )
    parser.add_argument(
        "--no-previous-router",
        action="store_true",
        help="run without the previous-router row (e.g. nothing comparable was shipped)",
    )
    parser.add_argument(
        "--ship",
        action="store_true",
        help="copy the shipped router (λ = 0.5 + lexical head) to model_store/proxy and its "
        "R = 0.90 thresholds to thresholds/proxy.yaml",
    )
    args = parser.parse_args(argv)
    bench = Benchmark(
        out=args.out,
        shared=args.shared,
        model_config=args.model_config,
        seed=args.seed,
        max_per_source=args.max_per_source,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else (5e-5 if args.full_finetune else 5e-4),
        head_lr=args.head_lr
        if args.head_lr is not None
        else (1e-3 if args.full_finetune else 1e-2),
        previous_router=None if args.no_previous_router else args.previous_router,
        full_finetune=args.full_finetune,
        sweep_max_posts=args.sweep_max_posts,
        reuse=not args.no_reuse,
        data_dir=args.data,
        command=" ".join(["python -m experiments.proxy.benchmark", *sys.argv[1:]])
        if argv is None
        else " ".join(["python -m experiments.proxy.benchmark", *argv]),
    )
    started = time.perf_counter()
    bench.timed("total", lambda: run(bench))
    results = write_results(bench, args.results)
    (args.out / "benchmark.json").write_text(
        json.dumps(
            {
                "timings": bench.timings,
                "reports": bench.reports,
                "orderings": {k: v.to_dict() for k, v in bench.orderings.items()},
            },
            indent=1,
            default=str,
        )
    )
    if args.ship:
        ship(bench, Path("model_store/proxy"), Path("thresholds/proxy.yaml"))
    print(f"results in {results} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
