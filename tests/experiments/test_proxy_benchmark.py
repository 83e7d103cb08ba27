"""The whole proxy benchmark, end to end, on a tiny dual encoder (the shipped router's family,
random weights) and a sliver of the real public data: every stage runs, docs/results.md-style
output is written, and each image is encoded once in the whole run (the feature cache)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from app.model.backbones.dual_encoder import ImageEncoder
from app.model.store import load_router, write_config
from app.model.tiny import make_tiny_router
from app.model.tiny_encoders import (
    TINY_IMAGE_SIZE,
    TINY_LORA,
    dual_encoder_router_config,
    make_tiny_image_encoder_weights,
    make_tiny_text_encoder_dir,
)
from app.thresholds import load_thresholds
from experiments.proxy.benchmark import EXPERT_EPOCHS, Benchmark, finished_run, run, ship
from experiments.proxy.results import ORDERINGS, write_results
from experiments.proxy.sources import CATEGORIES

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (the public datasets) is absent")
def test_benchmark_runs_every_stage(tmp_path, monkeypatch) -> None:
    config = dual_encoder_router_config(
        CATEGORIES,
        path=str(make_tiny_text_encoder_dir(tmp_path / "encoders" / "text")),
        image_path=str(make_tiny_image_encoder_weights(tmp_path / "encoders" / "lite0.pth")),
        image_size=TINY_IMAGE_SIZE,
        max_text_tokens=16,
        lora=TINY_LORA,
    )
    (tmp_path / "config").mkdir()
    write_config(config, tmp_path / "config")
    encoded = {"images": 0}
    forward = ImageEncoder.forward

    def counting(self: ImageEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
        encoded["images"] += pixel_values.shape[0]
        return forward(self, pixel_values)

    monkeypatch.setattr(ImageEncoder, "forward", counting)
    # The "previously shipped" router: a random tiny one with the proxy's categories, which
    # `ship` below must not disturb once the run has copied it aside.
    previous = make_tiny_router(tmp_path / "previous", categories=CATEGORIES, seed=1)
    bench_settings = {
        "out": tmp_path / "run",
        "shared": SHARED,
        "model_config": tmp_path / "config",
        "seed": 0,
        "max_per_source": 40,
        "epochs": 1,
        "batch_size": 16,
        "lr": 1e-3,
        "head_lr": 1e-2,
        "previous_router": previous,
    }
    bench = Benchmark(**bench_settings)
    run(bench)
    # Experts, teach, seven routers, evaluation and calibration share one image encoder:
    # with the run's feature cache every distinct image went through it exactly once.
    assert encoded["images"] == distinct_images(tmp_path / "run" / "data") > 0
    results = write_results(bench, tmp_path / "results.md")
    text = results.read_text()
    for row in (
        "experts (K = 1 each)",
        "BCE w/o mask",
        "masked BCE + distill (λ = 0.5)",
        "TF-IDF + LR (per category, text only)",
        "previous router (`--previous-router`)",
        "**shipped: λ = 0.5 + lexical head**",
    ):
        assert row in text
    assert set(bench.reports) == {
        "TF-IDF + LR",
        "previous router",
        "experts",
        "BCE w/o mask",
        "λ=0",
        "λ=0.25",
        "λ=0.5",
        "λ=0.75",
        "λ=1",
        "shipped",
    }
    assert set(bench.blend_weights) == set(bench.reports["λ=0.5"]["categories"])
    assert "of the oracle ceiling's average" in text
    categories = list(bench.reports["λ=0.5"]["categories"])
    assert len(categories) >= 5
    assert set(bench.thresholds) == {"0.90", "0.95"}
    # Every ordering claim ran, on all categories and the average, with a verdict in the text.
    assert list(bench.orderings) == [claim for claim, _, _ in ORDERINGS]
    for claim, result in bench.orderings.items():
        assert f"### {claim}" in text
        assert {d.category for d in result.differences} == {*categories, "average"}
        assert all(d.verdict in {"holds", "not shown", "reversed"} for d in result.differences)
    assert "Does our ordering match" in text and "does NOT hold" not in text
    assert (tmp_path / "run" / "previous-router" / "router.json").is_file()
    # Run again in the same work directory: every training stage is kept (same settings,
    # same data fingerprints), with its own recorded time; a changed setting trains afresh.
    again = Benchmark(**{**bench_settings, "sweep_max_posts": 0})
    run(again)
    assert set(again.reused) == {f"expert {c}" for c in categories} | {
        f"train {name}" for name in ("BCE w/o mask", "λ=0", "λ=0.25", "λ=0.5", "λ=0.75", "λ=1")
    }
    assert all(seconds and seconds > 0 for seconds in again.reused.values())
    assert "Reused from earlier runs" in write_results(again, tmp_path / "again.md").read_text()
    expert = again.train_config(
        again.data / "train.jsonl",
        again.out / f"expert-{categories[0]}",
        categories=(categories[0],),
        lam=0.0,
        epochs=EXPERT_EPOCHS.get(categories[0], again.epochs),
    )
    assert finished_run(expert) is not None
    assert finished_run(expert.model_copy(update={"lr": 2e-3})) is None
    assert finished_run(expert.model_copy(update={"data": again.data / "val.jsonl"})) is None
    ship(bench, tmp_path / "store", tmp_path / "proxy.yaml")
    router = load_router(tmp_path / "store")
    active = load_thresholds(
        tmp_path / "proxy.yaml", router.categories, router.config.model_version
    )
    assert set(active.taus) == set(categories)
    assert not (tmp_path / "store" / "checkpoints").exists()
    # What ships is the blended router, the one the thresholds were calibrated on.
    assert router.lexical is not None and router.config.model_version.endswith("+lexical")


def distinct_images(data: Path) -> int:
    """Distinct image files (by content) referenced by the run's splits."""
    digests = set()
    for split in ("train", "val", "test"):
        for line in (data / f"{split}.jsonl").read_text().splitlines():
            for image in json.loads(line)["images"]:
                digests.add(hashlib.sha256((data / image).read_bytes()).hexdigest())
    return len(digests)


def test_a_reused_run_without_its_seconds_gets_them_from_its_recorded_rate() -> None:
    from experiments.proxy.benchmark import _seconds_from_rate

    saved = {"samples_per_s": 16.0, "steps": 10, "config": {"batch_size": 32, "grad_accum": 2}}
    assert _seconds_from_rate(saved) == 40.0
    assert _seconds_from_rate({"steps": 10, "config": {"batch_size": 32}}) is None
