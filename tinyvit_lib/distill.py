"""Knowledge distillation: the loss that blends ground-truth labels with a teacher's predictions.

    loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL(p_teacher^T || p_student^T)

where p^T = softmax(logits / T). The T^2 factor (Hinton et al., 2015) keeps the gradient scale of
the soft term independent of T, so alpha means the same at every temperature. With alpha = 1 and
T = 1 the loss is TinyViT's pretraining objective: the cross-entropy between the teacher's
distribution and the student's, which differs from the KL term only by the teacher's entropy, a
constant of the data.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DistillationLoss", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy for integer labels (B,) or probability targets (B, C) (Mixup/CutMix)."""
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


class DistillationLoss(nn.Module):
    """(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T), batch mean.

    Args:
        alpha: weight of the teacher term, in [0, 1]; 0 is plain supervised training.
        temperature: T > 0; both distributions are softened by dividing logits by T.
        label_smoothing: applied to the hard-label term only.

    The teacher is given either as dense `teacher_logits` (an online teacher, or a store with
    every class), or as `teacher_probs`, a distribution already at temperature T (rebuilt from a
    sparse top-k record by the logit store).

    Raises:
        ValueError: alpha outside [0, 1], T <= 0, label_smoothing outside [0, 1), or a teacher that
            is missing when alpha > 0, given twice, or of another shape than the student's logits.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
        if not temperature > 0.0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, label_smoothing={self.label_smoothing}"

    def soft_term(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """T^2 * KL(teacher_probs || softmax(student / T)), batch mean."""
        T = self.temperature
        log_student = F.log_softmax(student_logits.float() / T, dim=-1)
        teacher_probs = teacher_probs.float()
        kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_student).sum(-1)
        return kl.mean() * T * T

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, *,
                teacher_logits: torch.Tensor | None = None,
                teacher_probs: torch.Tensor | None = None) -> torch.Tensor:
        if teacher_logits is not None and teacher_probs is not None:
            raise ValueError("give the teacher as teacher_logits or teacher_probs, not both")
        if teacher_logits is not None:
            teacher_probs = F.softmax(teacher_logits.float() / self.temperature, dim=-1)
        hard = soft_cross_entropy(student_logits.float(), labels, self.label_smoothing) if self.alpha < 1 else None
        if self.alpha == 0.0:
            return hard
        if teacher_probs is None:
            raise ValueError(f"alpha={self.alpha} needs a teacher (teacher_logits or teacher_probs)")
        if teacher_probs.shape != student_logits.shape:
            raise ValueError(f"teacher shape {tuple(teacher_probs.shape)} does not match "
                             f"the student's logits {tuple(student_logits.shape)}")
        soft = self.soft_term(student_logits, teacher_probs)
        return soft if hard is None else (1 - self.alpha) * hard + self.alpha * soft
