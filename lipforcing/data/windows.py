"""Training windows cut from decoded clips: the video window, its audio, references and the mouth mask.

Per sample (Lip Forcing recipe): a window of `frames` video frames (81 = 21 latents at full size),
a reference frame broadcast over time (`reference`: the window's first frame, as the released
teacher and Diffusion Forcing code take its first latent frame, or uniform over the whole clip, as
the paper describes), optionally a reference sequence of the same length (65-channel models) drawn
outside the window when the clip is long enough, the 16 kHz audio slice that plays with the window,
and a static lower-face mask (1 = keep, 0 = regenerate).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lipforcing.data import FPS
from lipforcing.data.shards import Clip, DryStream


@dataclass
class WindowConfig:
    frames: int = 81  # 4k + 1 so the VAE maps it to k + 1 latent frames
    size: int = 512  # frames are resized to size x size (the aligned crops are square)
    # window_first: the window's first frame (released code); clip_uniform: any frame of the clip (paper)
    reference: Literal["window_first", "clip_uniform"] = "window_first"
    # mouth region to regenerate, as fractions of the aligned face: top, bottom, left, right
    mask_box: list[float] = field(default_factory=lambda: [0.55, 0.95, 0.2, 0.8])
    # dataset tag -> relative weight; tags not listed weigh 1.0; empty = the shards' natural mix
    mixture: dict[str, float] = field(default_factory=dict)


@dataclass
class Window:
    video: torch.Tensor  # [T, 3, S, S] float in [0, 1]
    reference: torch.Tensor  # [1, 3, S, S]
    reference_sequence: torch.Tensor | None  # [T, 3, S, S] or None
    audio: torch.Tensor  # [T * 640] 16 kHz samples aligned with the window
    dataset: str
    key: str


def lower_face_mask(size: int, box: list[float]) -> torch.Tensor:
    """[1, 1, S, S] pixel mask: 0 inside the mouth box (regenerated), 1 elsewhere (kept)."""
    top, bottom, left, right = (round(f * size) for f in box)
    mask = torch.ones(1, 1, size, size)
    mask[..., top:bottom, left:right] = 0
    return mask


def keep_for_mixture(dataset: str, mixture: dict[str, float], rng: random.Random) -> bool:
    """Rejection sampling to the mixture: keep a sample with probability weight / max weight."""
    if not mixture:
        return True
    weight = mixture.get(dataset, 1.0)
    return rng.random() < weight / max(max(mixture.values()), 1.0)


def cut_window(clip: Clip, config: WindowConfig, rng: random.Random, reference_sequence: bool = False) -> Window | None:
    """A random training window from a clip, or None when the clip is shorter than one window.

    `reference_sequence` also cuts the unmasked reference clip a 65-channel model reads."""
    total = min(len(clip.frames), len(clip.audio) * FPS // clip.sample_rate)
    if total < config.frames:
        return None
    start = rng.randrange(total - config.frames + 1)
    per_frame = clip.sample_rate // FPS
    sequence = None
    if reference_sequence:
        outside = [s for s in range(total - config.frames + 1) if abs(s - start) >= config.frames]
        other = rng.choice(outside) if outside else rng.randrange(total - config.frames + 1)
        sequence = resize_frames(clip.frames[other : other + config.frames], config.size)
    reference = start if config.reference == "window_first" else rng.randrange(total)
    return Window(
        video=resize_frames(clip.frames[start : start + config.frames], config.size),
        reference=resize_frames(clip.frames[reference][None], config.size),
        reference_sequence=sequence,
        audio=torch.from_numpy(np.ascontiguousarray(clip.audio[start * per_frame : (start + config.frames) * per_frame])),
        dataset=str(clip.metadata.get("dataset", "")),
        key=clip.key,
    )


def windows(clips: Iterator[Clip], config: WindowConfig, seed: int, reference_sequence: bool = False) -> Iterator[Window]:
    rng = random.Random(seed)
    dry = DryStream(f"training window ({config.frames} frames, mixture {config.mixture or 'natural'})")
    for clip in clips:
        window = None
        if keep_for_mixture(str(clip.metadata.get("dataset", "")), config.mixture, rng):
            window = cut_window(clip, config, rng, reference_sequence)
        if window is None:
            dry.unused()
            continue
        dry.used()
        yield window


def collate(batch: list[Window]) -> dict[str, object]:
    return {
        "video": torch.stack([w.video for w in batch]),
        "reference": torch.stack([w.reference for w in batch]),
        "reference_sequence": None if batch[0].reference_sequence is None else torch.stack([w.reference_sequence for w in batch]),
        "audio": torch.stack([w.audio for w in batch]),
        "dataset": [w.dataset for w in batch],
        "key": [w.key for w in batch],
    }


def resize_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, size, size] in [0, 1], as every stage sees frames."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255)
    if video.shape[-1] != size or video.shape[-2] != size:
        video = F.interpolate(video, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return video.clamp(0, 1)
