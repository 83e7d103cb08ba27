"""app.training.losses: hand-computed values, masking, gradients and numerical stability."""

import math

import pytest
import torch
import torch.nn.functional as F

from app.training.losses import distillation_kl, masked_bce, router_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def kl_bernoulli(t: float, p: float) -> float:
    """Closed form in float64, with 0 · log 0 = 0."""
    out = 0.0
    if t > 0:
        out += t * math.log(t / p)
    if t < 1:
        out += (1 - t) * math.log((1 - t) / (1 - p))
    return out


def test_masked_bce_hand_value() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    labels = torch.tensor([[1, -1], [0, 1]])
    expected = (math.log(2) + softplus(-1.0) + softplus(-0.5)) / 3  # 3 annotated entries
    assert masked_bce(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_masked_entries_get_exactly_zero_gradient() -> None:
    logits = torch.tensor([[0.3, math.inf], [-2.0, math.nan]], requires_grad=True)
    labels = torch.tensor([[1.0, -1.0], [0.0, -1.0]])  # float labels work too
    loss = masked_bce(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None
    assert logits.grad[0, 1].item() == 0.0 and logits.grad[1, 1].item() == 0.0
    assert logits.grad[0, 0].item() != 0.0 and logits.grad[1, 0].item() != 0.0


def test_fully_masked_row_leaves_loss_unchanged() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    labels = torch.randint(-1, 2, (4, 3))
    extra_logits = torch.cat([logits, torch.randn(1, 3) * 10])
    extra_labels = torch.cat([labels, torch.full((1, 3), -1)])
    torch.testing.assert_close(masked_bce(extra_logits, extra_labels), masked_bce(logits, labels))


def test_fully_masked_batch_is_zero_with_grad_path() -> None:
    logits = torch.randn(2, 3, requires_grad=True)
    loss = masked_bce(logits, torch.full((2, 3), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_no_mask_baseline_treats_minus_one_as_negative() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 3)
    labels = torch.randint(-1, 2, (5, 3))
    expected = F.binary_cross_entropy_with_logits(logits, (labels == 1).float())
    torch.testing.assert_close(masked_bce(logits, labels, use_mask=False), expected)
    # and it differs from the masked loss whenever some entry is unannotated
    assert (labels == -1).any()
    assert not torch.allclose(masked_bce(logits, labels), expected)


def test_invalid_labels_and_shapes_raise() -> None:
    with pytest.raises(ValueError, match="labels"):
        masked_bce(torch.zeros(1, 2), torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        masked_bce(torch.zeros(1, 2), torch.zeros(2, 1))


def test_kl_zero_for_perfect_student() -> None:
    teacher = torch.tensor([[0.0, 0.3, 0.5], [0.9, 1.0, 0.01]])
    logits = torch.logit(teacher.double()).float()  # ±inf at t ∈ {0, 1}
    logits = logits.clamp(-100, 100)
    assert abs(distillation_kl(logits, teacher).item()) < 1e-6


def test_kl_finite_at_hard_targets_with_extreme_logits() -> None:
    teacher = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    logits = torch.tensor([[-100.0, 100.0, 100.0, -100.0]], requires_grad=True)
    loss = distillation_kl(logits, teacher)
    loss.backward()
    assert loss.item() == pytest.approx(200.0 / 4, rel=1e-6)  # the two wrong ones cost ~100
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.0, 0.0, 0.25, -0.25]]))


def test_kl_matches_closed_form() -> None:
    pairs = [(0.3, 0.4), (0.0, -1.5), (1.0, 2.0), (0.8, -0.7), (0.05, 3.0)]
    teacher = torch.tensor([[t for t, _ in pairs]])
    logits = torch.tensor([[z for _, z in pairs]])
    expected = sum(kl_bernoulli(t, 1 / (1 + math.exp(-z))) for t, z in pairs) / len(pairs)
    assert distillation_kl(logits, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_kl_gradient_equals_soft_target_bce_gradient() -> None:
    torch.manual_seed(2)
    teacher = torch.rand(6, 3)
    teacher[0, 0], teacher[1, 1] = 0.0, 1.0
    z1 = torch.randn(6, 3, requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    distillation_kl(z1, teacher).backward()
    F.binary_cross_entropy_with_logits(z2, teacher).backward()
    assert z1.grad is not None and z2.grad is not None
    torch.testing.assert_close(z1.grad, z2.grad)


def test_kl_bf16_logits() -> None:
    torch.manual_seed(3)
    teacher = torch.rand(4, 3)
    logits = (torch.randn(4, 3) * 5).to(torch.bfloat16).requires_grad_(True)
    loss = distillation_kl(logits, teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, distillation_kl(logits.detach().float(), teacher))
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad).all()
    bce = masked_bce(logits, torch.ones(4, 3))
    assert bce.dtype == torch.float32 and torch.isfinite(bce)


def test_kl_excludes_entries_without_teacher() -> None:
    teacher = torch.tensor([[0.2, math.nan], [math.nan, 0.7]])
    logits = torch.tensor([[0.5, 1.0], [-3.0, 0.1]], requires_grad=True)
    loss = distillation_kl(logits, teacher)  # no mask: NaN means "no teacher value"
    loss.backward()
    expected = (kl_bernoulli(0.2, 1 / (1 + math.exp(-0.5))) + kl_bernoulli(0.7, 0.52497918747)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logits.grad is not None
    assert logits.grad[0, 1].item() == 0.0 and logits.grad[1, 0].item() == 0.0
    mask = ~torch.isnan(teacher)
    torch.testing.assert_close(distillation_kl(logits, teacher, mask), loss)


def test_kl_fully_masked_and_invalid_teacher() -> None:
    logits = torch.randn(2, 2, requires_grad=True)
    loss = distillation_kl(logits, torch.full((2, 2), 0.5), torch.zeros(2, 2))
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="probabilities"):
        distillation_kl(logits, torch.tensor([[0.5, 1.5], [0.1, 0.2]]))
    with pytest.raises(ValueError, match="probabilities"):
        distillation_kl(logits, torch.tensor([[0.5, math.nan], [0.1, 0.2]]), torch.ones(2, 2))


def test_router_loss_lambda_mixing() -> None:
    torch.manual_seed(4)
    logits = torch.randn(8, 3)
    labels = torch.randint(-1, 2, (8, 3))
    teacher = torch.rand(8, 3)
    l_mask, l_kl = masked_bce(logits, labels), distillation_kl(logits, teacher)
    for lam in (0.0, 0.3, 0.5, 1.0):
        out = router_loss(logits, labels, teacher, lam=lam)
        torch.testing.assert_close(out.total, (1 - lam) * l_mask + lam * l_kl)
        torch.testing.assert_close(out.mask, l_mask)
        torch.testing.assert_close(out.distill, l_kl)
        assert out.lam == lam
    no_teacher = router_loss(logits, labels, lam=0.5)
    torch.testing.assert_close(no_teacher.total, l_mask)  # no teacher: λ is taken as 0
    assert no_teacher.lam == 0.0 and no_teacher.distill.item() == 0.0
    baseline = router_loss(logits, labels, teacher, lam=0.0, use_mask=False)
    torch.testing.assert_close(baseline.total, masked_bce(logits, labels, use_mask=False))
    with pytest.raises(ValueError, match="lam"):
        router_loss(logits, labels, teacher, lam=1.5)
    with pytest.raises(ValueError, match="teacher_mask"):
        router_loss(logits, labels, teacher_mask=torch.ones(8, 3))
