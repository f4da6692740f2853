"""Distribution Matching Distillation: the student's generator loss and the fake score's loss.

The frozen teacher ("real" score) and a trained copy that follows the student ("fake" score) both
predict x0 from a re-noised student sample. Their difference points from the student's
distribution toward the teacher's; the student is pulled along it (Self Forcing's DMD form):

    grad_i = (x0_fake - x0_real) / mean(|x0_student - x0_real|)       (per sample i)
    L_i    = 0.5 * mean((x0_student - stopgrad(x0_student - grad_i))^2)

A per-sample weight (the SyncNet reward) scales each L_i; see `reward.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dmd_gradient(x0_student: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """The normalised DMD direction, one normaliser per sample (dim 0)."""
    reduce = tuple(range(1, x0_student.dim()))
    normaliser = (x0_student - x0_real).abs().mean(dim=reduce, keepdim=True).clamp_min(1e-8)
    return (x0_fake - x0_real) / normaliser


def dmd_loss_per_sample(x0_student: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """L_i for each sample; its gradient w.r.t. x0_student is grad_i / (elements per sample)."""
    with torch.no_grad():
        grad = dmd_gradient(x0_student.float(), x0_real.float(), x0_fake.float())
        target = x0_student.float() - grad
    reduce = tuple(range(1, x0_student.dim()))
    return 0.5 * ((x0_student.float() - target) ** 2).mean(dim=reduce)


def fake_score_loss(x0_pred: Tensor, x0_student: Tensor) -> Tensor:
    """Denoising loss of the fake score on (detached) student samples, predicting x0."""
    return torch.nn.functional.mse_loss(x0_pred.float(), x0_student.detach().float())


def student_updates_at(iteration: int, student_every: int = 5) -> bool:
    """The 5:1 schedule: the fake score updates every iteration, the student every `student_every`-th.

    Iteration 0 updates both, so the first student step comes before the fake score drifts.
    """
    return iteration % student_every == 0
