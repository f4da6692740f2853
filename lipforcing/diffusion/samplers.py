"""The teacher's sampler: a 50-step Euler ODE on the shifted schedule with classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipforcing.diffusion.schedules import broadcast_time, shifted_timesteps, x0_from_velocity
from lipforcing.models.conditioning import Condition


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float | Tensor) -> Tensor:
    """uncond + s (cond - uncond); s a float or one value per sample [B]. Works on v or x0 alike."""
    if isinstance(scale, Tensor):
        scale = broadcast_time(scale, cond)
    return uncond + scale * (cond - uncond)


def guided_velocity(
    model: nn.Module,
    x: Tensor,
    t: Tensor,
    cond: Condition,
    null_cond: Condition | None = None,
    scale: float | Tensor = 1.0,
) -> Tensor:
    """The model's velocity at (x, t); with null_cond, CFG from one batched cond + uncond call."""
    if null_cond is None:
        return model(x, t, cond)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), Condition.cat([cond, null_cond])).chunk(2)
    return cfg_combine(v_cond, v_uncond, scale)


@dataclass
class TeacherSample:
    latents: Tensor  # [B, 16, F, h, w] final clean latent
    timesteps: Tensor  # the num_steps + 1 ODE nodes
    x0_trajectory: Tensor | None = None  # [num_steps, B, 16, F, h, w] x0 prediction at every step


@torch.no_grad()
def sample_teacher(
    model: nn.Module,
    noise: Tensor,
    cond: Condition,
    null_cond: Condition | None = None,
    guidance_scale: float = 4.5,
    num_steps: int = 50,
    shift: float = 5.0,
    save_trajectory: bool = False,
) -> TeacherSample:
    """Euler ODE from t = 1 (noise) to 0 over the shifted nodes; CFG when null_cond is given.

    save_trajectory keeps the (guided) x0 prediction of every step, for the teacher-trajectory analysis.
    """
    nodes = shifted_timesteps(num_steps, shift).to(noise.device, torch.float32)
    x, trajectory = noise, []
    for j in range(num_steps):
        t = nodes[j].expand(x.shape[0])
        v = guided_velocity(model, x, t, cond, null_cond, guidance_scale)
        if save_trajectory:
            trajectory.append(x0_from_velocity(x, v, t))
        x = x + (nodes[j + 1] - nodes[j]) * v
    return TeacherSample(x, nodes, torch.stack(trajectory) if save_trajectory else None)
