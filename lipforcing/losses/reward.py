"""The SyncNet reward (Re-DMD style): a forward-only weight per sample on the generator loss.

    w_i = exp(beta * R_i),  R_i = Sync-C of the decoded student sample against its audio

`per_sample` averages w_i * L_i over the batch; `self_normalised` divides by the sum of weights,
which keeps the loss scale fixed however large the rewards get.
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHTINGS = ("per_sample", "self_normalised")


def reward_weights(sync_confidence: Tensor, beta: float = 2.0) -> Tensor:
    """exp(beta * R), detached: no gradient reaches SyncNet or the decoder."""
    return torch.exp(beta * sync_confidence.detach().float())


def weighted_loss(per_sample_loss: Tensor, weights: Tensor | None, weighting: str = "per_sample") -> Tensor:
    """Combine per-sample losses with reward weights (None: a plain mean)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown reward weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if weights is None:
        return per_sample_loss.mean()
    weights = weights.to(per_sample_loss.dtype).detach()
    if weighting == "self_normalised":
        return (weights * per_sample_loss).sum() / weights.sum().clamp_min(1e-12)
    return (weights * per_sample_loss).mean()
