"""The whole proxy benchmark, end to end, on the tiny Qwen3-VL backbone and a sliver of the
real public data: every stage runs and docs/results.md-style output is written."""

from pathlib import Path

import pytest

from app.model.store import load_router
from app.model.tiny import make_tiny_router
from app.thresholds import load_thresholds
from experiments.proxy.benchmark import Benchmark, run, ship
from experiments.proxy.results import ORDERINGS, write_results
from experiments.proxy.sources import CATEGORIES

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (the public datasets) is absent")
def test_benchmark_runs_every_stage(tiny_store, tmp_path) -> None:
    # The "previously shipped" router: a random tiny one with the proxy's categories, which
    # `ship` below must not disturb once the run has copied it aside.
    previous = make_tiny_router(tmp_path / "previous", categories=CATEGORIES, seed=1)
    bench = Benchmark(
        out=tmp_path / "run",
        shared=SHARED,
        model_config=tiny_store,
        seed=0,
        max_per_source=40,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        head_lr=1e-2,
        previous_router=previous,
    )
    run(bench)
    results = write_results(bench, tmp_path / "results.md")
    text = results.read_text()
    for row in (
        "experts (K = 1 each)",
        "BCE w/o mask",
        "masked BCE + distill (λ = 0.5)",
        "TF-IDF + LR (per category, text only)",
        "previous router (shipped before this run)",
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
    }
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
    ship(bench, tmp_path / "store", tmp_path / "proxy.yaml")
    router = load_router(tmp_path / "store")
    active = load_thresholds(
        tmp_path / "proxy.yaml", router.categories, router.config.model_version
    )
    assert set(active.taus) == set(categories)
    assert not (tmp_path / "store" / "checkpoints").exists()
