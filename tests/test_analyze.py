"""`make analyze` (teacher-trajectory analysis -> recipe) and the DMD schedule ablations.

Unit tests pin the pieces (the per-t guidance of every `dmd.cfg_mode`, the two-call grid against
the teacher's own sampler, the mouth-region metric); one test runs the job end to end on real local
Ray with a SQLite MLflow store, synthetic held-out shards, a tiny teacher and a random SyncNet.
"""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch
from safetensors.torch import save_file

from lipforcing.analysis.recipe import landing_timestep, sync_band
from lipforcing.analysis.scoring import MouthFidelity
from lipforcing.analysis.trajectory import teacher_trajectories, two_call_grid
from lipforcing.config import ConfigError
from lipforcing.diffusion.samplers import guided_velocity, sample_teacher
from lipforcing.diffusion.schedules import shifted_timesteps, sync_window, x0_from_velocity
from lipforcing.models import build_teacher
from lipforcing.models.conditioning import random_condition
from lipforcing.models.config import model_config
from lipforcing.models.syncnet import StableSyncNet, SyncNetConfig, save_syncnet
from pipelines import tracking
from pipelines.analyze import AnalyzeConfig, analyze, validate
from pipelines.analyze.config import DEMO_TEACHER, teacher_location
from pipelines.analyze.job import gain_significance
from pipelines.distill_config import DistillConfig
from pipelines.jobs import resolve_config, run_job
from pipelines.stages.dmd import teacher_guidance
from tests.test_eval import write_shards

# Re-noising times planted around the 20..40 band (tau_40 = 0.5556, tau_20 = 0.8824): well inside,
# its two ends (included), just outside each end, and far outside.
LOW, HIGH = sync_window(20, 40)
PLANTED_T = torch.tensor([0.70, HIGH, LOW, 0.90, 0.54, 0.99, 0.10])
INSIDE = torch.tensor([True, True, True, False, False, False, False])


@pytest.mark.parametrize(
    ("mode", "inside_scale", "outside_scale"),
    [("window", 4.5, 1.0), ("reverse", 1.0, 4.5), ("all", 4.5, 4.5), ("none", 1.0, 1.0)],
)
def test_each_cfg_mode_applies_its_guidance_per_t(mode, inside_scale, outside_scale):
    scale = teacher_guidance(PLANTED_T, mode, 4.5, sync_window(20, 40))
    expected = torch.where(INSIDE, torch.tensor(inside_scale), torch.tensor(outside_scale))
    assert torch.equal(scale, expected)
    weak = teacher_guidance(PLANTED_T, mode, 0.5, sync_window(20, 40))  # a scale under 1 keeps the same places
    assert torch.equal(weak == 0.5, expected == 4.5)


def test_the_window_follows_window_steps():
    """A derived window (steps 10..25) moves the band: 0.70 (step ~34) is now outside, 0.90 inside."""
    scale = teacher_guidance(torch.tensor([0.70, 0.90]), "window", 4.5, sync_window(10, 25))
    assert scale.tolist() == [1.0, 4.5]


def test_cfg_mode_is_a_config_key_with_named_values():
    assert resolve_config(DistillConfig, ["dmd.cfg_mode=reverse"]).dmd.cfg_mode == "reverse"
    with pytest.raises(ConfigError, match=r"dmd.cfg_mode.*'window', 'all', 'none', 'reverse'"):
        resolve_config(DistillConfig, ["dmd.cfg_mode=static"])
    with pytest.raises(ValueError, match="dmd.cfg_mode"):
        teacher_guidance(PLANTED_T, "static", 4.5, sync_window())


def test_two_call_grid_matches_the_teachers_own_sampler_and_a_hand_computed_landing():
    """Landing at j1 = 1 with s0 = s1 = s is the teacher's Euler sampler's x0 prediction at step 1 (on
    a 10-step schedule, to keep it quick); landing at j1 = 6 is one Euler step of the first call's
    velocity from tau_0 straight to tau_6, then the second call's x0 there, computed here by hand."""
    cfg = model_config("tiny")
    teacher = build_teacher(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    cond = random_condition(cfg, 1, 3, 4, 4, generator)
    null = cond.null(torch.zeros(cfg.text_len, cfg.text_dim))
    noise = torch.randn(1, 16, 3, 4, 4, generator=generator)
    grid = two_call_grid(teacher, noise, cond, null, [1.0, 4.5], [1, 6], num_steps=10)
    for s in (1.0, 4.5):
        reference = sample_teacher(teacher, noise, cond, null, s, num_steps=10, save_trajectory=True).x0_trajectory[1]
        torch.testing.assert_close(grid[(s, s, 1)], reference, rtol=1e-4, atol=1e-5)
    nodes = shifted_timesteps(10, 5.0)
    with torch.no_grad():
        first = guided_velocity(teacher, noise, nodes[0].expand(1), cond, null, 1.0)
        landed = noise + (nodes[6] - nodes[0]) * first
        second = guided_velocity(teacher, landed, nodes[6].expand(1), cond, null, 4.5)
    torch.testing.assert_close(grid[(1.0, 4.5, 6)], x0_from_velocity(landed, second, nodes[6].expand(1)), rtol=1e-4, atol=1e-5)
    assert len(grid) == 8
    assert not torch.allclose(grid[(1.0, 4.5, 6)], grid[(4.5, 4.5, 6)])


def test_the_trajectory_scores_cfg_at_each_state_of_the_plain_ode():
    """`plain` is the no-CFG sampler's own x0 trajectory; `guided` is CFG's prediction from those same
    states, so guided - plain at step j is what one guided call does there (what DMD's window gates)."""
    cfg = model_config("tiny")
    teacher = build_teacher(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    cond = random_condition(cfg, 1, 3, 4, 4, generator)
    null = cond.null(torch.zeros(cfg.text_len, cfg.text_dim))
    noise = torch.randn(1, 16, 3, 4, 4, generator=generator)
    runs = teacher_trajectories(teacher, noise, cond, null, 4.5, num_steps=8)
    plain = sample_teacher(teacher, noise, cond, None, 1.0, num_steps=8, save_trajectory=True)
    torch.testing.assert_close(runs.plain, plain.x0_trajectory, rtol=1e-4, atol=1e-5)
    nodes = shifted_timesteps(8, 5.0)
    x = noise
    with torch.no_grad():
        for j in range(3):  # the plain ODE's state at step 3, then one guided call there
            x = x + (nodes[j + 1] - nodes[j]) * teacher(x, nodes[j].expand(1), cond)
        guided = x0_from_velocity(x, guided_velocity(teacher, x, nodes[3].expand(1), cond, null, 4.5), nodes[3].expand(1))
    torch.testing.assert_close(runs.guided[3], guided, rtol=1e-4, atol=1e-5)


def test_mouth_fidelity_reads_only_the_mouth_region():
    mouth = torch.zeros(32, 32)
    mouth[18:30, 6:26] = 1
    source = torch.full((5, 3, 32, 32), 0.5)
    outside = source.clone()
    outside[..., :10, :] = 1.0  # the eyes change, the mouth does not
    inside = source.clone()
    inside[..., 18:30, 6:26] += 0.25

    fallback = MouthFidelity(mouth)
    assert fallback.name == "mouth_l1"
    assert fallback(outside, source) == 0.0
    assert fallback(inside, source) == pytest.approx(0.25)

    class MeanDistance(torch.nn.Module):  # stands in for a traced LPIPS: one distance per image
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    lpips = MouthFidelity(mouth, torch.jit.script(MeanDistance()))
    assert lpips.name == "mouth_lpips"
    assert lpips(outside, source) == 0.0
    assert lpips(inside, source) == pytest.approx(0.5)  # in [-1, 1] the 0.25 step is 0.5, on the crop only


def test_a_band_read_from_noise_is_flagged():
    def clip(gain: float) -> dict:
        return {"plain": [{"sync_c": 1.0}] * 3, "guided": [{"sync_c": 1.0}, {"sync_c": 1.0 + gain}, {"sync_c": 1.0}]}

    assert gain_significance([clip(0.50), clip(0.55), clip(0.45)], step=1)["significant"] is True
    assert gain_significance([clip(0.01), clip(-0.02), clip(0.02)], step=1)["significant"] is False
    assert gain_significance([clip(0.5)], step=1)["significant"] is None  # one clip: no spread to judge by


def test_the_teacher_is_found_or_random_init_only_on_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert teacher_location(resolve_config(AnalyzeConfig, [])) == ""  # auto, nothing exported: random init
    with pytest.raises(ConfigError, match="teacher_weights"):
        teacher_location(resolve_config(AnalyzeConfig, ["profile=14b"]))
    with pytest.raises(ConfigError, match="teacher_weights"):
        teacher_location(resolve_config(AnalyzeConfig, ["teacher_weights=missing.safetensors"]))
    exported = tmp_path / DEMO_TEACHER
    exported.parent.mkdir(parents=True)
    exported.write_bytes(b"")
    assert teacher_location(resolve_config(AnalyzeConfig, [])) == DEMO_TEACHER


def test_analyze_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="landing_steps"):
        validate(resolve_config(AnalyzeConfig, ["landing_steps=[13,50]"]))
    with pytest.raises(ConfigError, match="syncnet_weights"):
        validate(resolve_config(AnalyzeConfig, ["syncnet_weights="]))


def test_analyze_job_writes_curves_plots_and_a_recipe_distill_accepts(tmp_path, monkeypatch, local_ray):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    write_shards(tmp_path / "heldout" / "shards")  # two usable clips, one too short
    teacher = build_teacher(model_config("tiny"))
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "teacher.safetensors"))
    save_syncnet(StableSyncNet(SyncNetConfig()), str(tmp_path / "syncnet.pt"))
    steps = 20
    argv = [
        "profile=tiny",
        f"data={tmp_path / 'heldout'}",
        f"output={tmp_path / 'analyze'}",
        f"teacher_weights={tmp_path / 'teacher.safetensors'}",
        f"syncnet_weights={tmp_path / 'syncnet.pt'}",
        "clips=4",
        "max_frames=17",
        f"model.teacher_steps={steps}",
        "landing_steps=[5,9]",
    ]
    assert run_job("pipelines.analyze", AnalyzeConfig, analyze, argv=argv) == 0

    out = tmp_path / "analyze"
    curves = json.loads((out / "curves.json").read_text())
    evidence = json.loads((out / "evidence.json").read_text())
    assert len(curves["clips"]) == 2  # the 5-frame clip is skipped
    for run in ("plain", "guided"):
        for metric in ("fidelity", "sync_c", "sync_d"):
            assert len(curves[run][metric]) == steps and all(math.isfinite(v) for v in curves[run][metric])
    assert len(curves["grid"]) == 2 * 2 * 5
    assert curves["plain"] != curves["guided"]  # CFG changes the trajectory
    assert "LPIPS fallback" in curves["fidelity_metric"]

    # The recipe is what the rule reads from the written curves, and distill loads it.
    rule = resolve_config(AnalyzeConfig, []).band
    band = sync_band(curves["guided"]["sync_c"], curves["plain"]["sync_c"], curves["guided"]["fidelity"],
                     curves["plain"]["fidelity"], rule.smooth, rule.keep, rule.cost_floor)  # fmt: skip
    config = resolve_config(DistillConfig, ["profile=tiny", f"config={out / 'recipe.yaml'}"])
    if band is None:
        assert config.dmd.window_steps == [20, 40] and evidence["band"] is None
    else:
        assert config.dmd.window_steps == [band.first, band.last] == evidence["band"]["window_steps"]
        assert config.model.teacher_steps == steps  # the steps count on the analysed schedule, not the profile's 50
    significance = evidence["band_significance"]
    if band is not None:  # two clips: the gain at the peak is weighed against their spread
        assert significance["step"] == band.peak and significance["standard_error"] is not None
    chosen = evidence["landing"]["chosen_step"]
    assert 5 <= evidence["landing"]["plateau"][0] <= chosen <= evidence["landing"]["plateau"][1] <= 9
    assert config.model.student_timesteps == [0.999, landing_timestep(chosen, steps)]
    assert config.student.noise_levels == [*config.model.student_timesteps, 0.0]
    assert (out / "plots" / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    assert "![factorial](plots/factorial.png)" in (out / "report.md").read_text()

    runs = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string="tags.job = 'analyze'", output_format="list")
    assert len(runs) == 1
    data = runs[0].data
    assert data.tags["random_init_teacher"] == "false" and data.tags["teacher"].endswith("teacher.safetensors")
    assert data.metrics["recipe/landing_step"] == chosen
    assert data.params["landing_steps"] == "[5, 9]"
    history = mlflow.tracking.MlflowClient().get_metric_history(runs[0].info.run_id, "guided/sync_c")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(steps))
    artifacts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=runs[0].info.run_id)}
    assert {"recipe.yaml", "evidence.json", "curves.json", "report.md", "plots", "config.yaml"} <= artifacts
