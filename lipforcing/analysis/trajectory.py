"""The teacher runs the analysis measures: the full ODE with and without CFG, and the two-call grid.

Latents are [B, 16, F, h, w]; t = 1 is noise. Node j of the teacher's schedule is tau_j of the
shifted 50-step ODE (`shifted_timesteps`), the same indexing `dmd.window_steps` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipforcing.diffusion.samplers import sample_teacher
from lipforcing.diffusion.schedules import shifted_timesteps, x0_from_velocity
from lipforcing.models.conditioning import Condition


@dataclass
class Trajectories:
    plain: Tensor  # [num_steps, B, 16, F, h, w] x0 prediction at every step, no CFG
    guided: Tensor  # the same with CFG at `scale`, from the same noise


def teacher_trajectories(
    model: nn.Module,
    noise: Tensor,
    cond: Condition,
    null_cond: Condition,
    scale: float = 4.5,
    num_steps: int = 50,
    shift: float = 5.0,
) -> Trajectories:
    """Both full teacher ODEs from one noise: the per-step x0 predictions the trajectory curves score."""
    plain = sample_teacher(model, noise, cond, None, 1.0, num_steps, shift, save_trajectory=True)
    guided = sample_teacher(model, noise, cond, null_cond, scale, num_steps, shift, save_trajectory=True)
    return Trajectories(plain.x0_trajectory, guided.x0_trajectory)


@torch.no_grad()
def two_call_grid(
    model: nn.Module,
    noise: Tensor,
    cond: Condition,
    null_cond: Condition,
    scales: Sequence[float],
    landing_steps: Sequence[int],
    num_steps: int = 50,
    shift: float = 5.0,
) -> dict[tuple[float, float, int], Tensor]:
    """(s0, s1, j1) -> the clean latent of a two-call Euler sampler [B, 16, F, h, w].

    Call 1 at tau_0 with scale s0; one Euler step lands at tau_j1; call 2 there with scale s1 projects
    to the clean estimate x_j1 - tau_j1 v. One batched cond + uncond evaluation serves every scale of
    a call (CFG is linear in s), so the grid costs 1 + len(scales) x len(landing_steps) evaluations.
    """
    nodes = shifted_timesteps(num_steps, shift).to(noise.device, torch.float32)
    batch = noise.shape[0]

    def both(x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        times = torch.full((batch,), t, device=x.device)
        velocity = model(torch.cat([x, x]), torch.cat([times, times]), Condition.cat([cond, null_cond]))
        return velocity.chunk(2)

    first_cond, first_uncond = both(noise, float(nodes[0]))
    grid: dict[tuple[float, float, int], Tensor] = {}
    for s0 in scales:
        v0 = first_uncond + s0 * (first_cond - first_uncond)
        for j1 in landing_steps:
            t1 = float(nodes[j1])
            landed = noise + (nodes[j1] - nodes[0]) * v0
            second_cond, second_uncond = both(landed, t1)
            for s1 in scales:
                v1 = second_uncond + s1 * (second_cond - second_uncond)
                grid[(float(s0), float(s1), int(j1))] = x0_from_velocity(landed, v1, torch.full((batch,), t1, device=noise.device))
    return grid
