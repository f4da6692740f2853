"""The teacher runs the analysis measures: per-step predictions with and without CFG along the ODE,
and the two-call grid.

Latents are [B, 16, F, h, w]; t = 1 is noise. Node j of the teacher's schedule is tau_j of the
shifted 50-step ODE (`shifted_timesteps`), the same indexing `dmd.window_steps` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lipforcing.diffusion.samplers import cfg_combine
from lipforcing.diffusion.schedules import shifted_timesteps, x0_from_velocity
from lipforcing.models.conditioning import Condition


@dataclass
class Trajectories:
    plain: Tensor  # [num_steps, B, 16, F, h, w] x0 prediction at every step of the ODE, no CFG
    guided: Tensor  # the x0 prediction with CFG at `scale` from the same state at every step


@torch.no_grad()
def teacher_trajectories(
    model: nn.Module,
    noise: Tensor,
    cond: Condition,
    null_cond: Condition,
    scale: float = 4.5,
    num_steps: int = 50,
    shift: float = 5.0,
) -> Trajectories:
    """The teacher's ODE without CFG from `noise`, and at each of its states the prediction with and
    without CFG (one batched cond + uncond call per step). The difference at step j is what CFG does
    at that step alone, which is what the Sync-Window gates in DMD (one guided call at the re-noising
    time); a second, guided ODE would instead carry every earlier step's CFG into its step j."""
    nodes = shifted_timesteps(num_steps, shift).to(noise.device, torch.float32)
    x, plain, guided = noise, [], []
    for j in range(num_steps):
        t = nodes[j].expand(x.shape[0])
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([t, t]), Condition.cat([cond, null_cond])).chunk(2)
        plain.append(x0_from_velocity(x, conditional, t))
        guided.append(x0_from_velocity(x, cfg_combine(conditional, unconditional, scale), t))
        x = x + (nodes[j + 1] - nodes[j]) * conditional
    return Trajectories(torch.stack(plain), torch.stack(guided))


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
