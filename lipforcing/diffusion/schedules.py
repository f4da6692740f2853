"""Rectified-flow schedules: x_t = (1 - t) x0 + t eps, t = 1 is noise, t = 0 is data.

Small pure functions shared by the samplers and the training stages.
"""

from __future__ import annotations

import torch
from torch import Tensor


def shift_time(t: Tensor | float, shift: float = 5.0) -> Tensor | float:
    """Wan's timestep shift t' = s t / (1 + (s - 1) t): spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def shifted_timesteps(num_steps: int = 50, shift: float = 5.0) -> Tensor:
    """The num_steps + 1 ODE nodes from 1.0 to 0.0; node j is the shift of 1 - j / num_steps.

    For 50 steps: tau_20 = 0.882, tau_30 = 0.769, tau_40 = 0.556.
    """
    return shift_time(1 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps, shift)


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps, with t broadcast from [B] or [B, F] over [B, C, F, H, W]."""
    t = broadcast_time(t, x0)
    return (1 - t) * x0 + t * noise


def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """The clean estimate x0_hat = x_t - t v (v = eps - x0)."""
    return x_t - broadcast_time(t, x_t) * v


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching regression target v = eps - x0."""
    return noise - x0


def sample_training_timesteps(
    shape: tuple[int, ...], shift: float = 5.0, generator: torch.Generator | None = None
) -> Tensor:
    """Teacher training times: uniform u shifted with s = 5, clipped to [0.001, 0.999]."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return shift_time(u, shift).clamp(0.001, 0.999).float()


def chunk_timesteps(
    batch: int,
    num_frames: int,
    chunk_frames: int = 3,
    choices: list[float] | tuple[float, ...] = (0.999, 0.769),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diffusion Forcing times [B, F]: one per chunk, drawn from the student's inference list, so the
    student trains only at the noise levels it meets when streaming."""
    num_chunks = -(-num_frames // chunk_frames)
    index = torch.randint(len(choices), (batch, num_chunks), generator=generator)
    return torch.tensor(choices)[index].repeat_interleave(chunk_frames, dim=1)[:, :num_frames]


def sync_window(first_step: int = 20, last_step: int = 40, num_steps: int = 50, shift: float = 5.0):
    """(tau_last, tau_first): the teacher-ODE time band of steps 20..40, (0.5556, 0.8824) by default."""
    nodes = shifted_timesteps(num_steps, shift)
    return nodes[last_step].item(), nodes[first_step].item()


def sync_window_scale(t: Tensor, scale: float = 4.5, window: tuple[float, float] | None = None) -> Tensor:
    """Sync-Window CFG: `scale` where t lies in [tau_40, tau_20] (ODE steps 20..40, ends included), else 1."""
    low, high = sync_window() if window is None else window
    t64 = t.double()
    inside = (t64 >= low - 1e-6) & (t64 <= high + 1e-6)
    return torch.where(inside, torch.full_like(t, scale), torch.ones_like(t))


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1, 1]; [B, F] -> [B, 1, F, 1, 1] (per-frame times of a [B, C, F, H, W] latent)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 2:
        return t[:, None, :, None, None]
    return t.reshape(-1, *([1] * (x.ndim - 1)))
