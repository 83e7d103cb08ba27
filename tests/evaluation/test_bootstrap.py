"""app.evaluation.bootstrap: weighted metrics equal the resampled ones, and the verdicts."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from app.evaluation.bootstrap import (
    AVERAGE,
    METRICS,
    paired_bootstrap,
    replicate_metrics,
    resample_weights,
    weighted_metrics,
)
from app.evaluation.metrics import auto_pass_at_recall, average_precision, recall_at_precision

CATEGORIES = ("a", "b")


def case(seed: int, n: int = 400, signal: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Labels in {-1, 0, 1} (category b annotated on half the posts) and tied scores."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 2)) < 0.3).astype(np.int64)
    labels[rng.random(n) < 0.5, 1] = -1
    noisy = signal * (labels == 1) + rng.random((n, 2)) * (1 - signal)
    return labels, np.round(noisy, 2)


def reference(y: np.ndarray, s: np.ndarray) -> list[float]:
    """The four metrics by app.evaluation.metrics, the definition the weighted code mirrors."""
    return [
        average_precision(y, s),
        recall_at_precision(y, s).recall,
        auto_pass_at_recall(y, s, 0.90).apr,
        auto_pass_at_recall(y, s, 0.95).apr,
    ]


@pytest.mark.parametrize("seed", range(6))
def test_weighted_metrics_equal_metrics_on_the_resampled_posts(seed: int) -> None:
    labels, scores = case(seed, n=120, signal=0.15 * (seed % 4))
    weights = resample_weights(120, n_boot=8, seed=seed)
    for k in range(2):
        got = weighted_metrics(labels[:, k], scores[:, k], weights)
        ones = weighted_metrics(labels[:, k], scores[:, k], np.ones((1, 120), dtype=np.int32))
        assert ones[0] == pytest.approx(reference(labels[:, k], scores[:, k]), abs=1e-12)
        for row, w in zip(got, weights, strict=True):
            drawn = np.repeat(np.arange(120), w)
            y, s = labels[drawn, k], scores[drawn, k]
            assert row == pytest.approx(reference(y, s), abs=1e-12)
            keep = y != -1
            assert row[0] == pytest.approx(average_precision_score(y[keep], s[keep]), abs=1e-12)


def test_resample_weights_are_draws_with_replacement_and_seeded() -> None:
    weights = resample_weights(50, n_boot=300, seed=3)
    assert weights.shape == (300, 50)
    assert (weights.sum(axis=1) == 50).all()
    assert 0.55 < np.mean(weights > 0) < 0.72  # 1 - (1 - 1/n)^n ≈ 0.634 of posts drawn
    assert np.array_equal(weights, resample_weights(50, n_boot=300, seed=3))
    assert not np.array_equal(weights, resample_weights(50, n_boot=300, seed=4))


def test_identical_systems_give_an_interval_around_zero() -> None:
    labels, scores = case(0)
    result = paired_bootstrap(labels, scores, scores.copy(), CATEGORIES, n_boot=200)
    for item in result.differences:
        assert item.low <= 0.0 <= item.high
        assert item.difference == 0.0
        assert item.verdict == "not shown"


def test_a_clearly_better_system_holds_and_the_reverse_is_reversed() -> None:
    labels, weak = case(1, n=600, signal=0.05)
    rng = np.random.default_rng(9)
    strong = 0.8 * (labels == 1) + 0.2 * rng.random(labels.shape)
    better = paired_bootstrap(labels, strong, weak, CATEGORIES, names=("strong", "weak"))
    for category in (*CATEGORIES, AVERAGE):
        for metric in ("pr_auc", "apr_r90"):
            item = better.get(category, metric)
            assert item.verdict == "holds", item
            assert item.low <= item.difference <= item.high
    worse = paired_bootstrap(labels, weak, strong, CATEGORIES)
    assert worse.get(AVERAGE, "pr_auc").verdict == "reversed"


def test_seeded_reproducibility() -> None:
    labels, scores = case(2)
    other = np.clip(scores + np.random.default_rng(0).normal(0, 0.1, scores.shape), 0, 1)
    first = paired_bootstrap(labels, scores, other, CATEGORIES, n_boot=100, seed=5)
    again = paired_bootstrap(labels, scores, other, CATEGORIES, n_boot=100, seed=5)
    changed = paired_bootstrap(labels, scores, other, CATEGORIES, n_boot=100, seed=6)
    assert first == again
    assert first.to_dict()["differences"] != changed.to_dict()["differences"]
    given = paired_bootstrap(
        labels, scores, other, CATEGORIES, weights=resample_weights(len(labels), 100, seed=5)
    )
    assert given.differences == first.differences


def test_each_category_is_measured_on_its_own_annotated_posts() -> None:
    labels, scores = case(3)
    # Scores of posts not annotated for b are garbage that would rank far above the rest:
    # they must change nothing, in the point estimates or in any resample.
    garbage = scores.copy()
    garbage[labels[:, 1] == -1, 1] = 50.0
    weights = resample_weights(len(labels), 50, seed=0)
    assert np.array_equal(
        replicate_metrics(labels, scores, weights), replicate_metrics(labels, garbage, weights)
    )
    result = paired_bootstrap(labels, scores, garbage, CATEGORIES, weights=weights)
    assert all(item.low == item.high == 0.0 for item in result.differences)
    keep = labels[:, 1] != -1
    assert result.get("b", "pr_auc").a == pytest.approx(
        average_precision_score(labels[keep, 1], scores[keep, 1]), abs=1e-12
    )


def test_average_is_the_mean_of_the_categories_per_resample() -> None:
    labels, scores = case(4)
    weights = resample_weights(len(labels), 20, seed=1)
    replicates = replicate_metrics(labels, scores, weights)
    assert replicates.shape == (20, 3, len(METRICS))
    assert np.allclose(replicates[:, 2], replicates[:, :2].mean(axis=1))


def test_a_category_without_positives_is_undefined_not_a_verdict() -> None:
    labels, scores = case(5)
    labels[labels[:, 1] == 1, 1] = 0
    result = paired_bootstrap(labels, scores, scores * 0.5, CATEGORIES, n_boot=50)
    item = result.get("b", "pr_auc")
    assert item.verdict == "undefined" and item.n_valid == 0 and math.isnan(item.low)
    assert result.to_dict()["differences"][4]["low"] is None
    assert result.get(AVERAGE, "pr_auc").a == result.get("a", "pr_auc").a


def test_five_thousand_posts_five_categories_in_a_few_seconds() -> None:
    import time

    rng = np.random.default_rng(0)
    labels = np.full((5000, 5), -1)
    for k in range(5):
        rows = rng.random(5000) < 0.4
        labels[rows, k] = rng.random(rows.sum()) < 0.2
    scores = rng.random((5000, 5))
    started = time.perf_counter()
    paired_bootstrap(labels, scores, rng.random((5000, 5)), [str(k) for k in range(5)])
    assert (
        time.perf_counter() - started < 30.0
    )  # ~1-2 s on one idle core; generous for a loaded CI machine
