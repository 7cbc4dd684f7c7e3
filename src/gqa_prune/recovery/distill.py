"""Knowledge-distillation loss (pure tensor math; the Trainer hook lives in ``trainer.py``).

With teacher logits ``t``, student logits ``s``, temperature ``T`` and weight ``α``
(Hinton et al., 2015)::

    p_t = softmax(t / T)              q_s = log_softmax(s / T)
    KL  = T² · mean_tokens Σ_v p_t[v] · (log p_t[v] − q_s[v])
    loss = α · KL + (1 − α) · CE(s, next tokens)

The T² factor keeps the gradient scale of the soft term independent of T.
With ``top_k``, the teacher keeps only its k largest logits per token, renormalised over
those k (``p_t`` sums to 1 over k entries); the student's log-probabilities stay over the
whole vocabulary and are read at those k indices, so the term is still ≥ 0 and is 0 only when
the student puts all its mass on the teacher's k tokens in the teacher's proportions. The
teacher's ``(B, L, V)`` logits can then be freed right after its forward pass: only
``(B, L, k)`` values and indices are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's soft targets for the predicting positions ``[:, :-1]``.

    Attributes:
        log_probs: ``(B, L-1, V)`` or, with top-k, ``(B, L-1, k)`` log-probabilities at T.
        indices: ``(B, L-1, k)`` vocabulary indices of the kept logits; None = all.
        temperature: T they were computed at.
    """

    log_probs: torch.Tensor
    indices: torch.Tensor | None
    temperature: float


def teacher_targets(
    teacher_logits: torch.Tensor, temperature: float, top_k: int | None = None
) -> TeacherTargets:
    """Soft targets from ``(B, L, V)`` teacher logits (fp32, renormalised over top-k)."""
    logits = teacher_logits[:, :-1].float() / temperature
    if top_k is None or top_k >= logits.shape[-1]:
        return TeacherTargets(F.log_softmax(logits, dim=-1), None, temperature)
    values, indices = logits.topk(top_k, dim=-1)
    return TeacherTargets(F.log_softmax(values, dim=-1), indices, temperature)


def kl_to_teacher(
    student_logits: torch.Tensor, targets: TeacherTargets, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)``, averaged over the predicting tokens.

    Args:
        student_logits: ``(B, L, V)``.
        targets: from :func:`teacher_targets` on the same batch.
        labels: ``(B, L)``; positions whose next label is ``-100`` are left out.

    Returns:
        Scalar tensor (fp32).
    """
    temp = targets.temperature
    log_q = F.log_softmax(student_logits[:, :-1].float() / temp, dim=-1)
    if targets.indices is not None:
        log_q = log_q.gather(-1, targets.indices)
    log_p = targets.log_probs
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, L-1)
    if labels is not None:
        mask = labels[:, 1:] != IGNORE_INDEX
        per_token = per_token[mask]
    return per_token.mean() * temp**2


def next_token_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t predicting ``labels[t+1]`` (fp32, ``-100`` ignored)."""
    logits = student_logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


@dataclass(frozen=True)
class DistillLoss:
    """The combined loss and its two terms (for logging)."""

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    targets: TeacherTargets,
    labels: torch.Tensor,
    alpha: float,
) -> DistillLoss:
    """``alpha · T²·KL(teacher ‖ student) + (1 − alpha) · CE`` on one batch."""
    kl = kl_to_teacher(student_logits, targets, labels)
    ce = next_token_ce(student_logits, labels)
    return DistillLoss(alpha * kl + (1.0 - alpha) * ce, kl, ce)
