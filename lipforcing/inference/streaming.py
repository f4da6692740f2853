"""Streaming inference with the causal student: two denoising calls per chunk, no CFG, constant memory.

Per chunk of 3 latent frames: call the student at t = 0.999 on fresh noise, project to x0, re-noise
to t = 0.769 (fresh noise), call again, project to the clean chunk, then run the clean chunk at t = 0
to write the KV cache. A stream decoder turns each chunk into pixels as it arrives: 9 frames for the
first chunk, 12 for every later one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lipforcing.diffusion.schedules import add_noise, x0_from_velocity
from lipforcing.models.attention import KVCache
from lipforcing.models.causal import CausalWanModel
from lipforcing.models.conditioning import Condition


class StreamDecoder(Protocol):
    """Stateful latent -> pixel decoder (TAE or VAE): frames [B, T, 3, H, W] in [0, 1] per chunk."""

    def reset(self) -> None: ...

    def decode(self, latents: Tensor) -> Tensor: ...


@dataclass
class StreamChunk:
    index: int
    latents: Tensor  # [B, 16, n, h, w] clean latent chunk
    frames: Tensor | None  # [B, 9 or 12, 3, H, W] pixels in [0, 1] when a decoder is given


def denoise_chunk(
    student: CausalWanModel,
    noise: Tensor,
    cond: Condition,
    cache: KVCache,
    timesteps: list[float] | tuple[float, ...] = (0.999, 0.769),
    generator: torch.Generator | None = None,
    exit_step: int | None = None,
    grad: bool = False,
) -> Tensor:
    """Few-step sampling of one chunk against the cache (which it does not modify); returns x0.

    Each step predicts x0 and re-noises it with fresh noise to the next time. Self Forcing's rollout
    stops at `exit_step` (default: the last) and, with grad=True, runs only that step with gradient.
    """
    exit_step = len(timesteps) - 1 if exit_step is None else exit_step
    x = noise
    for i, t in enumerate(timesteps[: exit_step + 1]):
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        with torch.set_grad_enabled(grad and i == exit_step):
            x0 = x0_from_velocity(x, student.forward_chunk(x, t_batch, cond, cache), t_batch)
        if i < exit_step:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = add_noise(x0, fresh, torch.full_like(t_batch, timesteps[i + 1]))
    return x0


def split_chunks(cond: Condition, chunk_frames: int, num_frames: int | None = None) -> Iterator[Condition]:
    """The per-chunk conditions of a whole-clip condition (its first num_frames latent frames)."""
    num_frames = cond.masked_video.shape[2] if num_frames is None else num_frames
    for start in range(0, num_frames, chunk_frames):
        yield cond.frames(start, min(start + chunk_frames, num_frames))


@torch.no_grad()
def stream_generate(
    student: CausalWanModel,
    cond: Condition | Iterable[Condition],
    decoder: StreamDecoder | None = None,
    timesteps: list[float] | tuple[float, ...] | None = None,
    generator: torch.Generator | None = None,
    cache: KVCache | None = None,
) -> Iterator[StreamChunk]:
    """Generate chunk by chunk, as the condition arrives.

    cond is a whole-clip Condition (split into chunks of cfg.chunk_frames latent frames) or any iterable
    of per-chunk Conditions, e.g. one fed live from audio and video encoders: nothing here grows with
    the rollout length except what the caller keeps. cache defaults to a fresh `student.new_cache()`.
    """
    cfg = student.cfg
    timesteps = cfg.student_timesteps if timesteps is None else timesteps
    chunks = split_chunks(cond, cfg.chunk_frames) if isinstance(cond, Condition) else cond
    cache = student.new_cache() if cache is None else cache
    if decoder is not None:
        decoder.reset()
    for index, chunk_cond in enumerate(chunks):
        b, c, n, h, w = chunk_cond.masked_video.shape
        noise = torch.randn((b, c, n, h, w), generator=generator, device=chunk_cond.masked_video.device)
        x0 = denoise_chunk(student, noise, chunk_cond, cache, timesteps, generator)
        student.cache_clean_chunk(x0, chunk_cond, cache)
        yield StreamChunk(index, x0, None if decoder is None else decoder.decode(x0))


def streaming_fps(counts: list[int], finished: list[float]) -> float:
    """Frames per second over the chunks after the first (`counts`: frames per chunk; `finished`:
    seconds from the start to each chunk's last frame); with one chunk, over it."""
    if len(counts) > 1:
        return sum(counts[1:]) / (finished[-1] - finished[0])
    return counts[0] / finished[0]  # one chunk: no steady state to separate out
