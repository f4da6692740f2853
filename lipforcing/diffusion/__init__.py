"""Rectified-flow schedules and the teacher sampler."""

from lipforcing.diffusion.samplers import TeacherSample, cfg_combine, guided_velocity, sample_teacher
from lipforcing.diffusion.schedules import (
    add_noise,
    broadcast_time,
    chunk_timesteps,
    sample_training_timesteps,
    shift_time,
    shifted_timesteps,
    sync_window,
    sync_window_scale,
    velocity_target,
    x0_from_velocity,
)

__all__ = [
    "TeacherSample",
    "add_noise",
    "broadcast_time",
    "cfg_combine",
    "chunk_timesteps",
    "guided_velocity",
    "sample_teacher",
    "sample_training_timesteps",
    "shift_time",
    "shifted_timesteps",
    "sync_window",
    "sync_window_scale",
    "velocity_target",
    "x0_from_velocity",
]
