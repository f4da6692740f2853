"""Diffusion Forcing: every chunk of the clip is noised to its own level, and the causal student
denoises them all in one block-causal pass.

The released recipe draws each chunk's level from the student's full list {0.999, 0.769, 0.0}, so
about a third of the chunks are clean: the student learns to read clean context, which is all its
streaming cache ever holds. The loss is on the clean estimate,

    L = 0.5 * mean((x0_hat - x0)^2),   x0_hat = x_t - t * v_pred,

where clean chunks (t = 0) give x0_hat = x0 exactly and so add context but no error term. The
older variant (velocity regression, levels without 0) stays reachable as `loss="velocity"`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lipforcing.diffusion.schedules import add_noise, chunk_timesteps, velocity_target, x0_from_velocity
from lipforcing.models.conditioning import Condition

LOSSES = ("x0", "velocity")


def diffusion_forcing_loss(
    student: nn.Module,
    x0: Tensor,
    cond: Condition,
    levels: list[float] | tuple[float, ...],
    chunk_frames: int,
    layout: tuple[int, int],
    generator: torch.Generator,
    loss: Literal["x0", "velocity"] = "x0",
) -> Tensor:
    """The loss of one batch x0 [B, 16, F, h, w]: per-chunk levels from `levels`, one (window, sink)
    block-causal attention layout for the whole batch."""
    if loss not in LOSSES:
        raise ValueError(f"unknown Diffusion Forcing loss {loss!r}; allowed: {', '.join(LOSSES)}")
    t = chunk_timesteps(x0.shape[0], x0.shape[2], chunk_frames, levels, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    noisy = add_noise(x0, noise, t)
    window, sink = layout
    velocity = student(noisy, t, cond, window_frames=window, sink_frames=sink)
    if loss == "velocity":
        return torch.nn.functional.mse_loss(velocity.float(), velocity_target(x0, noise).float())
    return 0.5 * torch.nn.functional.mse_loss(x0_from_velocity(noisy, velocity, t).float(), x0.float())
