"""RADAR's training objective (DESIGN.md, "Training objective").

L = (1 − λ) · L_mask + λ · L_distill, with
- L_mask = Σ_k m_k · BCE(p_k, y_k), m_k = 1[y_k ≠ −1];
- L_distill = Σ_k KL(Bernoulli(t_k) ‖ Bernoulli(p_k)) against a per-category teacher t_k.

Label codes are the paper's: −1 = not annotated, 0 = negative, 1 = positive. (The
partial-label literature uses −1 for *negative* and 0 for unknown; we do not.)

Both terms are averaged over their own valid (sample, category) entries in the batch, so a
batch's loss does not depend on how many unannotated entries it carries. Everything is
computed in float32 from logits, so bf16 logits are safe; entries that are excluded get
exactly zero gradient, even if their logit or teacher value is inf/NaN.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class RouterLoss(NamedTuple):
    """The total loss to backpropagate and its parts, for logging."""

    total: Tensor
    mask: Tensor  # L_mask (or the unmasked baseline when use_mask=False)
    distill: Tensor  # L_distill; 0 when no teacher was given
    lam: float  # the λ actually applied (0 when no teacher was given)


def _check_same_shape(logits: Tensor, other: Tensor, name: str) -> None:
    if logits.shape != other.shape or logits.ndim != 2:
        raise ValueError(
            f"logits and {name} must both be [B, K], got {logits.shape}, {other.shape}"
        )


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over the valid entries; 0 (with a grad path, not NaN) when none is valid."""
    total = torch.where(valid, values, torch.zeros_like(values)).sum()
    return total / valid.sum().clamp(min=1).to(total.dtype)


def masked_bce(logits: Tensor, labels: Tensor, *, use_mask: bool = True) -> Tensor:
    """Validity-masked BCE from logits, averaged over the annotated entries of the batch.

    logits: [B, K] (any float dtype); labels: [B, K] in {−1, 0, 1} (int or float).
    use_mask=False is the paper's "BCE w/o mask" baseline: −1 is treated as a negative and
    every entry counts.
    """
    _check_same_shape(logits, labels, "labels")
    if not ((labels == -1) | (labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be -1 (not annotated), 0 or 1")
    logits32 = logits.float()
    targets = (labels == 1).to(torch.float32)  # −1 → 0 only matters for the baseline
    if not use_mask:
        return F.binary_cross_entropy_with_logits(logits32, targets)
    valid = labels != -1
    # Zero masked logits *before* the loss: `where` then routes exactly zero gradient to
    # them, and an inf/NaN logit on an unannotated entry cannot leak in as 0 · inf = NaN.
    safe = torch.where(valid, logits32, torch.zeros_like(logits32))
    per_entry = F.binary_cross_entropy_with_logits(safe, targets, reduction="none")
    return _masked_mean(per_entry, valid)


def distillation_kl(logits: Tensor, teacher: Tensor, teacher_mask: Tensor | None = None) -> Tensor:
    """Σ_k KL(Bernoulli(t_k) ‖ Bernoulli(p_k)) from logits, averaged over the valid entries.

    KL = BCE_with_logits(z; t) − H(t): the soft-target BCE minus the teacher's entropy, a
    constant in z, so the gradient is the soft-target BCE's, sigmoid(z) − t, and a perfect
    student (sigmoid(z) = t) gets 0 (up to float32 rounding). `xlogy` makes H finite at
    t ∈ {0, 1}; softplus inside the BCE keeps extreme logits finite.

    teacher: [B, K] probabilities in [0, 1]; teacher_mask: [B, K] bool/0-1, 1 where the
    teacher scored the entry. Without a mask, the entries whose teacher value is NaN are
    excluded. A valid entry must hold a probability in [0, 1].
    """
    _check_same_shape(logits, teacher, "teacher")
    teacher32 = teacher.detach().float()
    if teacher_mask is None:
        valid = ~torch.isnan(teacher32)
    else:
        _check_same_shape(logits, teacher_mask, "teacher_mask")
        valid = teacher_mask.bool()
    in_range = (teacher32 >= 0) & (teacher32 <= 1)  # False for NaN
    if not (in_range | ~valid).all():
        raise ValueError("teacher values of valid entries must be probabilities in [0, 1]")
    zeros = torch.zeros_like(teacher32)
    # Sanitise both inputs of excluded entries so their gradient is exactly 0, not 0 · NaN.
    t = torch.where(valid, teacher32, zeros)
    logits32 = logits.float()
    z = torch.where(valid, logits32, torch.zeros_like(logits32))
    soft_bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    neg_entropy = torch.special.xlogy(t, t) + torch.special.xlogy(1 - t, 1 - t)
    return _masked_mean(soft_bce + neg_entropy, valid)


def router_loss(
    logits: Tensor,
    labels: Tensor,
    teacher: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    lam: float = 0.5,
    use_mask: bool = True,
) -> RouterLoss:
    """L = (1 − λ) · L_mask + λ · L_distill, with the parts for logging.

    Without a teacher there is no distillation term and λ is taken as 0 (L = L_mask), so
    that a teacher-less run is not silently trained at (1 − λ) times the learning rate.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if teacher is None and teacher_mask is not None:
        raise ValueError("teacher_mask given without a teacher")
    l_mask = masked_bce(logits, labels, use_mask=use_mask)
    if teacher is None:
        return RouterLoss(l_mask, l_mask, torch.zeros_like(l_mask), 0.0)
    l_distill = distillation_kl(logits, teacher, teacher_mask)
    total = (1.0 - lam) * l_mask + lam * l_distill
    return RouterLoss(total, l_mask, l_distill, lam)
