"""Training windows cut from decoded clips: the video window, its audio, references and the mouth mask.

Per sample (Lip Forcing recipe): a window of `frames` video frames (81 = 21 latents at full size),
a reference frame broadcast over time (`reference`: the window's first frame, as the released
teacher and Diffusion Forcing code take its first latent frame, or uniform over the whole clip, as
the paper describes), optionally a reference sequence of the same length (65-channel models) drawn
outside the window when the clip is long enough, the 16 kHz audio slice that plays with the window,
and a static lower-face mask (1 = keep, 0 = regenerate).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lipforcing.data import FPS
from lipforcing.data.shards import Clip, DryStream, decode_mp4, decode_wav


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


@dataclass
class WindowPlan:
    """Which frames a window takes: its first frame, the reference frame, the reference sequence's start."""

    start: int
    reference: int
    sequence: int | None

    def indices(self, frames: int) -> list[int]:
        """Frame indices in the order `assemble` reads them: window, reference, reference sequence."""
        sequence = [] if self.sequence is None else list(range(self.sequence, self.sequence + frames))
        return [*range(self.start, self.start + frames), self.reference, *sequence]


def plan_window(total: int, config: WindowConfig, rng: random.Random, reference_sequence: bool) -> WindowPlan | None:
    """A random window of a clip of `total` frames (None when shorter than one window); with
    `reference_sequence`, also the unmasked reference clip a 65-channel model reads, drawn outside it."""
    if total < config.frames:
        return None
    start = rng.randrange(total - config.frames + 1)
    sequence = None
    if reference_sequence:
        outside = [s for s in range(total - config.frames + 1) if abs(s - start) >= config.frames]
        sequence = rng.choice(outside) if outside else rng.randrange(total - config.frames + 1)
    reference = start if config.reference == "window_first" else rng.randrange(total)
    return WindowPlan(start, reference, sequence)


def assemble(plan: WindowPlan, frames: np.ndarray, audio: np.ndarray, rate: int, config: WindowConfig, dataset: str, key: str) -> Window:
    """The Window from the frames at `plan.indices` (in that order) and the clip's audio."""
    n, per_frame = config.frames, rate // FPS
    return Window(
        video=resize_frames(frames[:n], config.size),
        reference=resize_frames(frames[n : n + 1], config.size),
        reference_sequence=None if plan.sequence is None else resize_frames(frames[n + 1 :], config.size),
        audio=torch.from_numpy(np.ascontiguousarray(audio[plan.start * per_frame : (plan.start + n) * per_frame])),
        dataset=dataset,
        key=key,
    )


def cut_window(clip: Clip, config: WindowConfig, rng: random.Random, reference_sequence: bool = False) -> Window | None:
    """A random training window from a decoded clip, or None when it is shorter than one window."""
    plan = plan_window(min(len(clip.frames), len(clip.audio) * FPS // clip.sample_rate), config, rng, reference_sequence)
    if plan is None:
        return None
    frames = clip.frames[plan.indices(config.frames)]
    return assemble(plan, frames, clip.audio, clip.sample_rate, config, str(clip.metadata.get("dataset", "")), clip.key)


def sample_window(
    sample: dict, config: WindowConfig, rng: random.Random, reference_sequence: bool = False, metadata: dict | None = None
) -> Window | None:
    """A random training window straight from a raw shard sample, decoding only its frames, at
    `config.size` (the frame count comes from the sample's json, as the data job writes it;
    `metadata` is that json when the caller has parsed it already)."""
    metadata = json.loads(sample["json"]) if metadata is None else metadata
    audio, rate = decode_wav(sample["wav"])
    if "num_frames" not in metadata:  # shards from elsewhere: decode the whole clip once
        clip = Clip(sample["__key__"], decode_mp4(sample["mp4"], size=config.size), audio, rate, metadata)
        return cut_window(clip, config, rng, reference_sequence)
    plan = plan_window(min(int(metadata["num_frames"]), len(audio) * FPS // rate), config, rng, reference_sequence)
    if plan is None:
        return None
    frames = decode_mp4(sample["mp4"], plan.indices(config.frames), config.size)
    return assemble(plan, frames, audio, rate, config, str(metadata.get("dataset", "")), sample["__key__"])


def windows(
    samples: Iterator[dict], config: WindowConfig, seed: int, skips: Callable[[Exception], bool], reference_sequence: bool = False
) -> Iterator[Window]:
    """Training windows from raw shard samples, drawn to the dataset mixture (decided on the json,
    before any decoding); a sample that fails to decode goes to `skips`."""
    rng = random.Random(seed)
    dry = DryStream(f"training window ({config.frames} frames, mixture {config.mixture or 'natural'})")
    for sample in samples:
        window = None
        try:
            metadata = json.loads(sample["json"])
            if keep_for_mixture(str(metadata.get("dataset", "")), config.mixture, rng):
                window = sample_window(sample, config, rng, reference_sequence, metadata)
        except Exception as error:  # noqa: BLE001 - a broken sample is counted and skipped, never fatal
            skips(error)
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
