"""From measured curves to a distillation recipe: the Sync-Window and the student's landing step.

Both rules read averages over held-out clips. Fidelity is a distance to the source (mouth-region
LPIPS, or its fallback): lower is better. Sync is Sync-C: higher is better.

Sync band (-> `dmd.window_steps`). Per teacher ODE step j, CFG's sync gain g(j) = SyncC_cfg(j) -
SyncC_plain(j) and its fidelity cost c(j) = F_cfg(j) - F_plain(j). Efficiency e(j) = g(j) /
max(c(j), floor) where g(j) > 0, else 0; the floor (`cost_floor` x the largest |c|) keeps a step
where CFG costs nothing from dominating on noise. e is smoothed by a centred moving average of
`smooth` steps. The band is the contiguous run of steps around the most efficient one whose
efficiency is at least `keep` x that maximum (with keep = 0.5, the peak's full width at half maximum,
which puts the edges of a step-shaped efficiency exactly where the step is): where CFG buys the most
Sync-C per unit of fidelity lost.

Landing step (-> the student's second timestep). Over the two-call grid (first call s0, second call
s1, landing step j1), every cell's Sync-C and fidelity are min-max normalised over the whole grid,
score = sync_n - balance * fidelity_n, smoothed along j1. The schedule (s0, s1) with the highest
score wins; its plateau is the contiguous run of j1 around its best score within `tolerance` x the
score's range along j1, and the chosen landing step is that best j1. The student's timesteps are then
(0.999, tau_j1) on the teacher's shifted nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import yaml

from lipforcing.diffusion.schedules import shifted_timesteps

FIRST_STUDENT_TIMESTEP = 0.999  # the student's first call, near pure noise (released)


def moving_average(values: Sequence[float], width: int) -> np.ndarray:
    """Centred moving average; the ends repeat the edge values, so a flat curve stays flat."""
    values = np.asarray(values, dtype=np.float64)
    if width <= 1:
        return values
    half = width // 2
    padded = np.concatenate([np.full(half, values[0]), values, np.full(width - 1 - half, values[-1])])
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def contiguous_run(mask: np.ndarray, centre: int) -> tuple[int, int]:
    """(first, last) index of the run of True in `mask` that contains `centre`."""
    first = last = centre
    while first > 0 and mask[first - 1]:
        first -= 1
    while last < len(mask) - 1 and mask[last + 1]:
        last += 1
    return first, last


@dataclass
class SyncBand:
    first: int  # first ODE step that gets CFG
    last: int  # last one (included)
    efficiency: np.ndarray  # [num_steps] e(j), what the band was read from
    peak: int  # the most efficient step


def sync_band(
    sync_cfg: Sequence[float],
    sync_plain: Sequence[float],
    fidelity_cfg: Sequence[float],
    fidelity_plain: Sequence[float],
    smooth: int = 5,
    keep: float = 0.5,
    cost_floor: float = 0.1,
) -> SyncBand | None:
    """The sync-favouring band of ODE steps (module docstring), or None where CFG never raises Sync-C."""
    gain = np.subtract(sync_cfg, sync_plain, dtype=np.float64)
    cost = np.subtract(fidelity_cfg, fidelity_plain, dtype=np.float64)
    scale = np.abs(cost).max()
    floor = cost_floor * scale if scale > 0 else 1.0
    efficiency = moving_average(np.where(gain > 0, gain / np.maximum(cost, floor), 0.0), smooth)
    peak = int(np.argmax(efficiency))
    if efficiency[peak] <= 0:
        return None
    first, last = contiguous_run(efficiency >= keep * efficiency[peak], peak)
    return SyncBand(first, last, efficiency, peak)


@dataclass
class Landing:
    schedule: tuple[float, float]  # (s0, s1) of the winning two-call schedule
    first: int  # plateau of landing steps
    last: int
    chosen: int  # the landing step j1 the student lands at
    scores: dict[tuple[float, float], np.ndarray]  # per schedule, the score along the landing steps


def landing_plateau(
    sync: Mapping[tuple[float, float], Sequence[float]],
    fidelity: Mapping[tuple[float, float], Sequence[float]],
    landing_steps: Sequence[int],
    balance: float = 1.0,
    smooth: int = 3,
    tolerance: float = 0.1,
) -> Landing:
    """The winning schedule, its landing plateau and chosen j1 (module docstring). `sync` and
    `fidelity` map (s0, s1) to one value per entry of `landing_steps`."""
    schedules = list(sync)
    all_sync = np.array([sync[s] for s in schedules], dtype=np.float64)
    all_fidelity = np.array([fidelity[s] for s in schedules], dtype=np.float64)

    def normalised(values: np.ndarray) -> np.ndarray:
        span = values.max() - values.min()
        return (values - values.min()) / span if span > 0 else np.zeros_like(values)

    combined = normalised(all_sync) - balance * normalised(all_fidelity)
    scores = {s: moving_average(row, smooth) for s, row in zip(schedules, combined)}
    best = max(schedules, key=lambda s: scores[s].max())  # first in grid order on a tie
    curve = scores[best]
    peak = int(np.argmax(curve))
    span = curve.max() - curve.min()
    first, last = contiguous_run(curve >= curve[peak] - tolerance * span, peak)
    return Landing(best, int(landing_steps[first]), int(landing_steps[last]), int(landing_steps[peak]), scores)


def landing_timestep(j1: int, num_steps: int = 50, shift: float = 5.0) -> float:
    """The teacher ODE's node tau_j1 to 3 decimals, as the released config writes it (j1 = 30: 0.769)."""
    return round(float(shifted_timesteps(num_steps, shift)[j1]), 3)


def recipe_fragment(
    band: SyncBand | None, landing: Landing | None, num_steps: int = 50, shift: float = 5.0
) -> dict:
    """The distill config fragment (`make distill config=recipe.yaml`): the window (with the teacher
    schedule its steps count on), the student's two timesteps and the Diffusion Forcing noise levels
    that follow them (the steps plus clean, 0.0)."""
    fragment: dict = {}
    if band is not None:  # steps of this schedule: the fragment names it, so distill maps them to the same times
        fragment["dmd"] = {"window_steps": [band.first, band.last]}
        fragment["model"] = {"teacher_steps": num_steps, "shift": shift}
    if landing is not None:
        steps = [FIRST_STUDENT_TIMESTEP, landing_timestep(landing.chosen, num_steps, shift)]
        fragment.setdefault("model", {})["student_timesteps"] = steps
        fragment["student"] = {"noise_levels": [*steps, 0.0]}
    return fragment


def recipe_yaml(fragment: dict, notes: Sequence[str]) -> str:
    """The fragment as YAML, `notes` (where it came from) as comments above it: the config loader
    accepts only known keys, so provenance lives in comments and in the evidence file beside it."""
    return "".join(f"# {line}\n" for line in notes) + yaml.safe_dump(fragment, sort_keys=False)
