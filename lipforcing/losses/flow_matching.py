"""Rectified-flow matching: regress the velocity eps - x0 at x_t = (1 - t) x0 + t eps."""

from __future__ import annotations

from torch import Tensor

from lipforcing.diffusion.schedules import velocity_target


def flow_matching_loss(velocity_pred: Tensor, x0: Tensor, noise: Tensor, weight: Tensor | None = None) -> Tensor:
    """MSE to the target velocity; `weight` (broadcastable, e.g. a region mask) reweights elements."""
    error = (velocity_pred.float() - velocity_target(x0, noise).float()) ** 2
    if weight is None:
        return error.mean()
    weight = weight.to(error.dtype).expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1e-8)

