"""app.evaluation.metrics against scikit-learn, torchmetrics and hand-computed cases."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, precision_recall_curve
from torchmetrics.classification import BinaryRecallAtFixedPrecision

from app.evaluation.metrics import (
    auto_pass_at_recall,
    average_precision,
    bootstrap_recall_ci,
    evaluate_scores,
    overall_auto_pass_rate,
    recall_at_precision,
)

SEEDS = range(40)


def random_case(seed: int, n: int = 60, annotated_share: float = 0.7) -> tuple:
    """Labels in {-1, 0, 1} and scores with many ties (one decimal), at least one positive.

    The signal strength varies with the seed (from none to strong), so that some cases
    cannot reach the precision asked and some must dispatch everything.
    """
    rng = np.random.default_rng(seed)
    y = rng.choice([-1, 0, 1], size=n, p=[1 - annotated_share, annotated_share * 0.7, 0.21])
    y[0] = 1
    signal = (seed % 4) * 0.15
    noisy = signal * (y == 1) + rng.random(n) * (1 - signal)
    if seed % 5 == 0:  # a positive among the lowest scores: dispatch-all at recall 1
        noisy[0] = noisy.min()
    s = np.round(noisy, 1).astype(np.float32).astype(np.float64)  # exact in float32 too
    return y, s


def test_ap_hand_case_is_step_wise_not_trapezoid() -> None:
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert average_precision(y, s) == pytest.approx(0.8333333333333333, abs=1e-12)
    precision, recall, _ = precision_recall_curve(y, s)
    assert auc(recall, precision) == pytest.approx(0.7916666, abs=1e-6)  # what we must not do


@pytest.mark.parametrize("seed", SEEDS)
def test_ap_matches_sklearn_with_ties(seed: int) -> None:
    y, s = random_case(seed)
    keep = y != -1
    expected = average_precision_score(y[keep], s[keep])
    assert average_precision(y, s) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_recall_at_precision_matches_torchmetrics(seed: int) -> None:
    y, s = random_case(seed)
    keep = y != -1
    for min_precision in (0.6, 0.8, 0.95):
        metric = BinaryRecallAtFixedPrecision(min_precision=min_precision)
        ref_recall, ref_threshold = metric(torch.tensor(s[keep]), torch.tensor(y[keep]))
        ours = recall_at_precision(y, s, min_precision)
        assert ours.recall == pytest.approx(float(ref_recall), abs=1e-6)
        if math.isnan(float(ref_threshold)):
            assert math.isnan(ours.threshold)
        else:
            assert ours.threshold == pytest.approx(float(ref_threshold), abs=1e-6)


def test_recall_at_precision_unreachable_is_zero() -> None:
    y, s = np.array([0, 0, 1, 0]), np.array([0.9, 0.8, 0.1, 0.5])
    assert recall_at_precision(y, s, 0.6) == (0.0, pytest.approx(math.nan, nan_ok=True))
    assert recall_at_precision(y, s, 0.25) == (1.0, 0.1)


def test_auto_pass_hand_case_with_ties() -> None:
    y = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.7, 0.7, 0.5, 0.5, 0.2, 0.2, 0.1])
    # Recall 0.5 needs 2 of 3 positives: dispatch the 0.9 and both 0.7s; 0.5 is the highest
    # auto-passed score, so p > 0.5 reproduces that split.
    assert auto_pass_at_recall(y, s, 0.5) == (5 / 8, 0.5, 2 / 3)
    # Recall 0.9 needs the positive tied with a negative at 0.5: both go, never split.
    assert auto_pass_at_recall(y, s, 0.9) == (3 / 8, 0.2, 1.0)
    assert auto_pass_at_recall(y, s, 1.0) == (3 / 8, 0.2, 1.0)
    # A positive tied with the lowest scores: everything is dispatched.
    apr, tau, rec = auto_pass_at_recall(np.array([0, 1, 0, 1]), np.array([0.1, 0.1, 0.3, 0.8]), 0.9)
    assert (apr, tau, rec) == (0.0, -math.inf, 1.0)
    assert not (np.array([0.0, 0.1]) <= tau).any()


def test_auto_pass_exact_recall_boundary() -> None:
    y = np.array([1] * 10 + [0] * 10)
    s = np.r_[np.linspace(0.55, 1.0, 10), np.linspace(0.0, 0.6, 10)]
    apr, tau, rec = auto_pass_at_recall(y, s, 0.9)  # 9 of 10 positives is exactly 0.9
    assert rec == 0.9
    assert tau == 0.6
    assert apr == pytest.approx(np.mean(s <= tau))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_auto_pass_against_sklearn_curve(seed: int, target: float) -> None:
    y, s = random_case(seed)
    keep = y != -1
    yk, sk = y[keep], s[keep]
    _, recall, thresholds = precision_recall_curve(yk, sk)  # predicts s >= threshold
    t_star = thresholds[recall[:-1] >= target].max()  # highest qualifying threshold
    below = sk[sk < t_star]
    expected_tau = below.max() if below.size else -math.inf
    apr, tau, rec = auto_pass_at_recall(y, s, target)
    assert tau == expected_tau
    assert apr == pytest.approx(np.mean(sk < t_star), abs=1e-12)
    # The contract the service relies on: dispatch iff p > tau reproduces the recall and APR.
    dispatched = sk > tau
    assert rec == pytest.approx(dispatched[yk == 1].mean(), abs=1e-12)
    assert rec >= target
    assert apr == pytest.approx(1 - dispatched.mean(), abs=1e-12)
    assert tau == -math.inf or tau in set(sk)  # an observed score: ties are never split
    higher = np.unique(sk[sk > tau])
    if higher.size:  # any higher tau would auto-pass a positive too many
        assert (sk[yk == 1] > higher[0]).mean() < target


def test_annotation_mask_excludes_minus_one() -> None:
    y, s = random_case(3)
    keep = y != -1
    junk_scores = s.copy()
    junk_scores[~keep] = np.where(np.arange((~keep).sum()) % 2, 1.0, 0.0)
    for fn in (average_precision, lambda a, b: recall_at_precision(a, b, 0.6)):
        assert fn(y, s) == fn(y, junk_scores) == fn(y[keep], s[keep])
    assert auto_pass_at_recall(y, junk_scores, 0.9) == auto_pass_at_recall(y[keep], s[keep], 0.9)
    nan_scores = s.copy()
    nan_scores[~keep] = np.nan  # unannotated entries may carry no score at all
    assert average_precision(y, nan_scores) == average_precision(y, s)


def test_no_positives_is_undefined_not_zero() -> None:
    y, s = np.array([0, 0, -1]), np.array([0.2, 0.4, 0.9])
    assert math.isnan(average_precision(y, s))
    assert all(math.isnan(v) for v in recall_at_precision(y, s))
    assert all(math.isnan(v) for v in auto_pass_at_recall(y, s, 0.9))
    assert all(math.isnan(v) for v in bootstrap_recall_ci(y, s, 0.5))
    assert math.isnan(average_precision(np.array([-1, -1]), s[:2]))


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="labels"):
        average_precision(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="finite"):
        average_precision(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="recall"):
        auto_pass_at_recall(np.array([0, 1]), np.array([0.1, 0.2]), 0.0)


def test_evaluate_scores_report() -> None:
    rng = np.random.default_rng(0)
    n = 200
    labels = np.full((n, 3), -1)
    labels[:100, 0] = rng.random(100) < 0.2  # disjoint pipelines: one category each
    labels[100:180, 1] = rng.random(80) < 0.3
    labels[180:, 2] = 0  # annotated, but no positive
    labels[:100, 0][0] = 1
    scores = np.clip(0.4 * (labels == 1) + rng.random((n, 3)) * 0.6, 0, 1)
    report = evaluate_scores(labels, scores, ["lqc", "rcs", "fe"])
    lqc, rcs, fe = (report.categories[k] for k in ("lqc", "rcs", "fe"))
    assert (lqc.n_annotated, rcs.n_annotated, fe.n_annotated) == (100, 80, 20)
    assert lqc.n_positive == int((labels[:, 0] == 1).sum())
    assert lqc.pr_auc == average_precision(labels[:, 0], scores[:, 0])
    assert (lqc.apr_r95, lqc.tau_r95, lqc.recall_r95) == auto_pass_at_recall(
        labels[:, 0], scores[:, 0], 0.95
    )
    assert lqc.oracle_apr == pytest.approx(1 - lqc.n_positive / 100)
    assert (lqc.random_apr_r90, lqc.random_apr_r95) == pytest.approx((0.1, 0.05))
    assert lqc.defined and rcs.defined and lqc.undefined_reason is None
    assert not fe.defined and fe.undefined_reason == "no positive samples"
    assert math.isnan(fe.pr_auc) and math.isnan(fe.apr_r90) and fe.oracle_apr == 1.0
    assert report.n_defined == 2
    assert report.averages["pr_auc"] == pytest.approx((lqc.pr_auc + rcs.pr_auc) / 2)
    assert report.averages["apr_r90"] == pytest.approx((lqc.apr_r90 + rcs.apr_r90) / 2)
    as_json = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert as_json["categories"]["fe"]["pr_auc"] is None


def test_evaluate_scores_nothing_defined() -> None:
    report = evaluate_scores(np.full((4, 1), -1), np.zeros((4, 1)), ["lqc"])
    assert report.n_defined == 0
    assert report.categories["lqc"].undefined_reason == "no annotated samples"
    assert all(math.isnan(v) for v in report.averages.values())
    with pytest.raises(ValueError):
        evaluate_scores(np.zeros((4, 2)), np.zeros((4, 2)), ["lqc"])


def test_overall_auto_pass_rate() -> None:
    scores = np.array([[0.1, 0.2], [0.5, 0.1], [0.3, 0.3], [0.3, 0.9]])
    assert overall_auto_pass_rate(scores, [0.3, 0.3]) == 0.5  # p == tau is auto-pass
    assert overall_auto_pass_rate(scores, np.array([-math.inf, 1.0])) == 0.0
    assert math.isnan(overall_auto_pass_rate(np.zeros((0, 2)), [0.5, 0.5]))
    with pytest.raises(ValueError):
        overall_auto_pass_rate(scores, [0.3])


def test_bootstrap_ci_contains_point_and_matches_row_resampling() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(400) < 0.25).astype(int)
    s = np.clip(0.3 * y + rng.random(400) * 0.7, 0, 1)
    tau = auto_pass_at_recall(y, s, 0.9).tau
    ci = bootstrap_recall_ci(y, s, tau, n_boot=2000, seed=0)
    assert ci.low <= ci.recall <= ci.high
    assert ci.recall == pytest.approx((s[y == 1] > tau).mean())
    assert ci == bootstrap_recall_ci(y, s, tau, n_boot=2000, seed=0)  # seeded
    # The count shortcut must agree with literally resampling rows.
    idx = rng.integers(0, 400, size=(2000, 400))
    pos, hit = y[idx] == 1, (y[idx] == 1) & (s[idx] > tau)
    literal = hit.sum(1) / pos.sum(1)
    assert np.quantile(literal, [0.025, 0.975]) == pytest.approx([ci.low, ci.high], abs=0.02)
