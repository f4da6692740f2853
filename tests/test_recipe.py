"""The recipe rules of the teacher-trajectory analysis, on synthetic curves with a planted answer."""

from __future__ import annotations

import numpy as np
import pytest

from lipforcing.analysis.recipe import (
    landing_plateau,
    landing_timestep,
    recipe_fragment,
    recipe_yaml,
    sync_band,
)
from lipforcing.diffusion.schedules import sync_window
from pipelines.distill_config import DistillConfig
from pipelines.jobs import resolve_config

STEPS = 50


def planted_trajectory(first: int, last: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-step curves where CFG buys the most Sync-C per fidelity lost exactly on [first, last]:
    a large gain there at a small cost, a small gain elsewhere at a large cost, plus noise."""
    rng = np.random.default_rng(seed)
    steps = np.arange(STEPS)
    inside = (steps >= first) & (steps <= last)
    plain_sync = 2.0 + 0.05 * steps / STEPS
    plain_fidelity = 0.4 - 0.2 * steps / STEPS
    gain = np.where(inside, 1.2, 0.15) + rng.normal(0, 0.02, STEPS)
    cost = np.where(inside, 0.02, 0.05) + rng.normal(0, 0.002, STEPS)
    return {
        "sync_cfg": plain_sync + gain,
        "sync_plain": plain_sync,
        "fidelity_cfg": plain_fidelity + cost,
        "fidelity_plain": plain_fidelity,
    }


@pytest.mark.parametrize(("first", "last"), [(20, 40), (8, 17), (30, 45)])
def test_sync_band_recovers_a_planted_band(first, last):
    band = sync_band(**planted_trajectory(first, last))
    assert (band.first, band.last) == (first, last)
    assert first <= band.peak <= last
    assert band.efficiency.shape == (STEPS,)


def test_sync_band_prefers_gain_per_fidelity_lost_over_raw_gain():
    """Where CFG gains most Sync-C but costs ten times the fidelity, it is not the band."""
    steps = np.arange(STEPS)
    plain = np.zeros(STEPS)
    gain = np.where((steps >= 5) & (steps <= 12), 2.0, np.where((steps >= 25) & (steps <= 35), 1.0, 0.0))
    cost = np.where((steps >= 5) & (steps <= 12), 1.0, 0.05)
    band = sync_band(plain + gain, plain, plain + cost, plain)
    assert (band.first, band.last) == (25, 35)


def test_no_band_when_cfg_never_raises_sync():
    curves = planted_trajectory(20, 40)
    curves["sync_cfg"] = curves["sync_plain"] - 0.1
    assert sync_band(**curves) is None


def planted_grid(plateau: tuple[int, int], chosen: int) -> tuple[dict, dict, list[int]]:
    """A two-call grid where (s0=1, s1=4.5) wins (best Sync-C at the best fidelity) with a near-flat
    top on `plateau`, best at `chosen`."""
    landing = list(range(13, 41))
    j = np.array(landing, dtype=float)
    first, last = plateau
    top = np.where((j >= first) & (j <= last), 1.0, 0.7 - 0.05 * np.minimum(abs(j - first), abs(j - last)))
    top -= 0.02 * abs(j - chosen) / (last - first)  # a gentle peak inside the flat top
    base_fidelity = np.full_like(j, 0.3)
    sync = {(1.0, 4.5): 6.0 + top, (1.0, 1.0): 5.0 + 0.5 * top, (4.5, 4.5): 5.5 + 0.6 * top, (4.5, 1.0): 5.2 + 0 * j}
    fidelity = {key: base_fidelity + extra for key, extra in [((1.0, 4.5), 0.0), ((1.0, 1.0), 0.0), ((4.5, 4.5), 0.05), ((4.5, 1.0), 0.04)]}
    return sync, fidelity, landing


def test_landing_plateau_finds_the_winning_schedule_and_its_plateau():
    sync, fidelity, landing = planted_grid((25, 32), chosen=30)
    found = landing_plateau(sync, fidelity, landing, smooth=1)
    assert found.schedule == (1.0, 4.5)
    assert (found.first, found.last) == (25, 32)
    assert found.chosen == 30
    assert set(found.scores) == set(sync)


def test_landing_timesteps_are_the_teacher_nodes():
    """Landing at j1 = 30 is the released second timestep; j1 = 25 the uniform two-step one."""
    assert landing_timestep(30) == 0.769
    assert landing_timestep(25) == 0.833
    low, high = sync_window(20, 40)
    assert (landing_timestep(40), landing_timestep(20)) == (round(low, 3), round(high, 3)) == (0.556, 0.882)


def test_recipe_round_trips_through_the_distill_config_loader(tmp_path):
    band = sync_band(**planted_trajectory(20, 40))
    sync, fidelity, landing_steps = planted_grid((25, 32), chosen=30)
    landing = landing_plateau(sync, fidelity, landing_steps, smooth=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(recipe_fragment(band, landing), ["derived from planted curves", "second note"]))
    assert path.read_text().startswith("# derived from planted curves\n# second note\n")

    config = resolve_config(DistillConfig, ["profile=tiny", f"config={path}", "dmd.train.steps=3"])
    assert config.dmd.window_steps == [20, 40]
    assert config.model.student_timesteps == [0.999, 0.769]
    assert config.student.noise_levels == [0.999, 0.769, 0.0]
    assert config.dmd.train.steps == 3  # overrides still apply on top of the recipe
    assert config.model.lora_rank == 16  # and the profile's own values stay


def test_a_recipe_without_a_band_leaves_the_window_as_configured():
    sync, fidelity, landing_steps = planted_grid((25, 32), chosen=30)
    fragment = recipe_fragment(None, landing_plateau(sync, fidelity, landing_steps, smooth=1))
    assert "dmd" not in fragment and fragment["model"]["student_timesteps"] == [0.999, 0.769]
