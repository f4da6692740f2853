"""Distillation pieces in one process: the rollout, CFG window, audio dropout, Diffusion Forcing overfit."""

from __future__ import annotations

import os

import pytest
import torch

from lipforcing.config import ConfigError
from lipforcing.diffusion.schedules import sync_window, sync_window_scale
from lipforcing.losses.diffusion_forcing import diffusion_forcing_loss
from lipforcing.models import build_student, model_config, random_condition
from pipelines.distill import validate
from pipelines.distill_config import DistillConfig
from pipelines.jobs import resolve_config
from pipelines.stages.dmd import dmd_timesteps, rollout
from pipelines.stages.teacher import drop_audio


@pytest.fixture(scope="module")
def tiny():
    cfg = model_config("tiny")
    torch.manual_seed(0)
    return cfg, build_student(cfg)


def test_rollout_keeps_gradients_only_at_the_exit_step(tiny):
    cfg, student = tiny
    cond = random_condition(cfg, 1, 9, 4, 4, torch.Generator().manual_seed(0))
    calls = []
    original = student.forward_chunk

    def spy(x, t, c, cache, write=False):
        calls.append((round(float(t[0]), 3), torch.is_grad_enabled(), write))
        return original(x, t, c, cache, write)

    student.forward_chunk = spy
    try:
        x0 = rollout(student, cond, (1, 16, 9, 4, 4), [0.999, 0.769], exit_index=1, generator=torch.Generator().manual_seed(1))
    finally:
        del student.forward_chunk
    assert x0.shape == (1, 16, 9, 4, 4) and x0.requires_grad
    per_chunk = [(0.999, False, False), (0.769, True, False), (0.0, False, True)]
    assert calls == per_chunk * 3  # 3 chunks: no-grad step, exit step with grad, clean cache write


def test_rollout_exit_at_first_step_skips_the_second_call(tiny):
    cfg, student = tiny
    cond = random_condition(cfg, 1, 6, 4, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = rollout(student, cond, (1, 16, 6, 4, 4), [0.999, 0.769], exit_index=0, generator=torch.Generator())
    assert x0.shape == (1, 16, 6, 4, 4) and not x0.requires_grad


def shifted(u: float) -> float:
    return 5 * u / (1 + 4 * u)


def test_dmd_renoising_defaults_to_the_released_shifted_uniform():
    """Released Lip Forcing: u ~ U[0.001, 0.999], then shifted. Self Forcing's index range [20, 980]
    of 1000 never goes below shift(0.02) = 0.093; the released draw does, about 1.9 % of the time."""
    dmd = DistillConfig().dmd
    assert dmd.timestep_sampling == "shifted_uniform" and dmd.timestep_bounds == [0.001, 0.999]
    t = dmd_timesteps(20_000, dmd, 5.0, torch.Generator().manual_seed(0))
    assert t.min() >= shifted(0.001) - 1e-6 and t.max() <= shifted(0.999) + 1e-6
    below = float((t < shifted(0.02)).float().mean())
    assert abs(below - 0.019 / 0.998) < 0.004
    assert abs(float((t < shifted(0.5)).float().mean()) - 0.5) < 0.015  # the median maps through the shift

    dmd.timestep_sampling = "index_range"
    t = dmd_timesteps(20_000, dmd, 5.0, torch.Generator().manual_seed(0))
    assert t.min() >= shifted(0.02) - 1e-6 and t.max() <= shifted(0.98) + 1e-6


@pytest.mark.parametrize(("sampling", "share"), [("shifted_uniform", 0.4 / 0.998), ("index_range", 0.4 / 0.96 + 0.001)])
def test_sync_window_cfg_is_chosen_per_sample(sampling, share):
    low, high = sync_window(20, 40)
    t = torch.tensor([0.3, low, 0.7, high, 0.95])
    assert sync_window_scale(t, 4.5, (low, high)).tolist() == [1.0, 4.5, 4.5, 4.5, 1.0]
    dmd = DistillConfig().dmd
    dmd.timestep_sampling = sampling
    drawn = (sync_window_scale(dmd_timesteps(40_000, dmd, 5.0, torch.Generator()), 4.5) > 1).float().mean()
    assert abs(float(drawn) - share) < 0.01  # steps 20..40 are u in [0.2, 0.6]


def test_audio_dropout_swaps_in_the_null_condition(tiny):
    cfg, _ = tiny
    cond = random_condition(cfg, 64, 3, 4, 4, torch.Generator().manual_seed(0))
    negative = torch.full((cfg.text_len, cfg.text_dim), 7.0)
    dropped = drop_audio(cond, negative, 0.5, torch.Generator().manual_seed(0))
    silent = (dropped.audio.abs().sum(dim=(1, 2)) == 0)
    assert 10 < int(silent.sum()) < 54
    assert torch.all(dropped.text[silent] == 7.0)
    assert torch.equal(dropped.audio[~silent], cond.audio[~silent])
    assert torch.equal(dropped.masked_video, cond.masked_video)


def test_diffusion_forcing_overfits_one_batch(tiny):
    """The student stage's loss on one fixed batch must fall clearly within a few dozen steps."""
    cfg, _ = tiny
    torch.manual_seed(0)
    student = build_student(cfg)
    cond = random_condition(cfg, 2, 6, 4, 4, torch.Generator().manual_seed(3))
    x0 = torch.randn(2, 16, 6, 4, 4, generator=torch.Generator().manual_seed(4))
    levels = DistillConfig().student.noise_levels
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = diffusion_forcing_loss(student, x0, cond, levels, 3, (7, 1), torch.Generator().manual_seed(5))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_config_validation_names_keys(tmp_path):
    import webdataset as wds

    for folder, sample in (("data", {"mp4": b"v", "wav": b"a", "json": b"{}"}), ("cache", {"pth": b"t"})):
        os.makedirs(tmp_path / folder / "shards")
        with wds.TarWriter(str(tmp_path / folder / "shards" / "00000.tar")) as sink:
            sink.write({"__key__": "k", **sample})
    data = f"data={tmp_path / 'data'}"
    with pytest.raises(ConfigError, match="stages"):
        validate(resolve_config(DistillConfig, ["stages=[teacher,gan]", data]))
    with pytest.raises(ConfigError, match=r"model.tae_weights, teacher_model.dit_weights, model.dit_weights, model.vae_weights"):
        validate(resolve_config(DistillConfig, ["profile=1.3b", data]))  # would train random weights at 1.3B
    weights = ["model.tae_weights=t", "teacher_model.dit_weights=w", "model.dit_weights=s", f"latents={tmp_path / 'cache'}"]
    validate(resolve_config(DistillConfig, ["profile=1.3b", *weights]))  # a latent cache stands in for the encoders
    validate(resolve_config(DistillConfig, ["profile=14b", "allow_random_init=true", data]))
    with pytest.raises(ConfigError, match="'data'.*no WebDataset shards"):  # before anything is submitted
        validate(resolve_config(DistillConfig, [f"data={tmp_path / 'nothing'}"]))
    with pytest.raises(ConfigError, match=r"'dmd.train.effective_batch' = 64 is not a multiple of .* 1 x 5"):
        validate(resolve_config(DistillConfig, ["profile=14b", "allow_random_init=true", data, "dmd.train.effective_batch=64", "dmd.train.num_workers=5"]))
    with pytest.raises(ConfigError, match="reward_weighting.*'per_sample', 'self_normalised'"):
        resolve_config(DistillConfig, ["dmd.reward_weighting=softmax"])


def test_profiles_carry_the_paper_recipe():
    config = resolve_config(DistillConfig, ["profile=1.3b"])
    assert (config.model.dim, config.model.num_layers) == (1536, 30)
    assert (config.window.frames, config.window.size) == (81, 512)
    assert config.student.train.steps == 5000 and config.student.train.warmup_steps == 1000
    assert config.dmd.train.lr == 2e-6 and config.dmd.train.betas == [0.0, 0.999]
    assert config.dmd.student_every == 5 and config.dmd.reward_beta == 2.0
    assert resolve_config(DistillConfig, ["profile=14b"]).model.dim == 5120
    for profile in ("1.3b", "14b"):  # released students read the reference sequence: 65 input channels
        real = resolve_config(DistillConfig, [f"profile={profile}"])
        assert real.model.in_channels == real.teacher_model.in_channels == 65
    assert resolve_config(DistillConfig, []).model.in_channels == 49


def test_the_real_students_learn_from_the_14b_teacher():
    small = resolve_config(DistillConfig, ["profile=1.3b"])
    assert (small.teacher_model.dim, small.teacher_model.num_layers) == (5120, 40)
    assert (small.model.dim, small.model.num_layers) == (1536, 30)
    assert not small.same_size_teacher()
    assert resolve_config(DistillConfig, ["profile=14b"]).same_size_teacher()
    assert resolve_config(DistillConfig, []).same_size_teacher()


def test_a_smaller_student_needs_its_own_base(tmp_path):
    from types import SimpleNamespace

    from pipelines.stages.common import DiffusionStage

    config = resolve_config(DistillConfig, ["profile=1.3b"])
    stage = SimpleNamespace(context=SimpleNamespace(config=config))
    with pytest.raises(ConfigError, match="model.dit_weights"):
        DiffusionStage.student_base(stage)
    config.model.dit_weights = str(tmp_path / "wan2.1-t2v-1.3b.safetensors")
    assert DiffusionStage.student_base(stage) is None  # None: the profile's own dit_weights (+ dit_adapter)


def test_ema_is_off_by_default_and_never_starts_at_step_zero():
    """Released: no EMA, the raw student is exported. When on, the EMA starts as a copy of the student
    at the first student step from `ema_start_step` on, then follows every student step."""
    from types import SimpleNamespace

    from pipelines.stages.dmd import DistributionMatching

    dmd = DistillConfig().dmd
    assert dmd.ema is False
    module = torch.nn.Linear(2, 1, bias=False)
    stage = SimpleNamespace(context=SimpleNamespace(config=SimpleNamespace(dmd=dmd)), ema={})
    engines = {"student": SimpleNamespace(module=module)}
    for iteration in range(12):
        DistributionMatching.end_iteration(stage, engines, iteration)
    assert stage.ema == {}

    dmd.ema, dmd.ema_start_step, dmd.student_every, dmd.ema_decay = True, 3, 5, 0.5
    with torch.no_grad():
        module.weight.fill_(1.0)
    for iteration in range(5):  # iteration 0 is a student step, but before the start
        DistributionMatching.end_iteration(stage, engines, iteration)
    assert stage.ema == {}
    DistributionMatching.end_iteration(stage, engines, 5)  # the first student step from iteration 3 on
    assert stage.ema["weight"].tolist() == [[1.0, 1.0]]
    with torch.no_grad():
        module.weight.fill_(3.0)
    for iteration in range(6, 11):
        DistributionMatching.end_iteration(stage, engines, iteration)
    assert stage.ema["weight"].tolist() == [[2.0, 2.0]]  # one student step (10): 0.5 * 1 + 0.5 * 3

    with pytest.raises(ConfigError, match="dmd.ema_start_step"):
        validate(resolve_config(DistillConfig, ["dmd.ema=true", "dmd.ema_start_step=0"]))
