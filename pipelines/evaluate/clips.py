"""The clips `make eval` scores: held-out shards cut to what the student generates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lipforcing.config import ConfigError
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.shards import Clip, shard_urls
from lipforcing.data.windows import resize_frames


@dataclass
class EvalClip:
    """One clip cut to what is evaluated: frames resized to the model's size, audio under them."""

    key: str
    video: Tensor  # [T, 3, S, S] in [0, 1], T = 4k + 1
    audio: Tensor  # [T * 640] float32, 16 kHz


def eval_length(clip: Clip) -> int:
    """Frames evaluated: the longest 4k+1 prefix that has audio under every frame (0 if none)."""
    total = min(len(clip.frames), len(clip.audio) * FPS // clip.sample_rate)
    return (total - 1) // 4 * 4 + 1 if total > 0 else 0


def prepare_clip(clip: Clip, size: int, min_frames: int, max_frames: int = 0) -> EvalClip | str:
    """The evaluated cut of a clip (at most `max_frames` when > 0), or the reason it is skipped."""
    if clip.sample_rate != SAMPLE_RATE:
        return f"audio at {clip.sample_rate} Hz; the data job writes {SAMPLE_RATE} Hz"
    frames = eval_length(clip)
    if max_frames > 0 and frames > max_frames:
        frames = (max_frames - 1) // 4 * 4 + 1
    if frames < min_frames:
        return f"{frames} usable frames; the first chunk alone needs {min_frames}"
    per_frame = clip.sample_rate // FPS
    audio = torch.from_numpy(np.ascontiguousarray(clip.audio[: frames * per_frame], dtype=np.float32))
    return EvalClip(clip.key, resize_frames(clip.frames[:frames], size), audio)


def heldout_shards(data: str) -> list[str]:
    """The shards to evaluate, or a config error that says where held-out shards come from."""
    try:
        return shard_urls(data)
    except FileNotFoundError as err:
        raise ConfigError(
            f"config key 'data' is {data!r}: {err}. The data job writes the identities it holds out of "
            "training to <output>/heldout (split.* in data_jobs/config.py): run `make data`, or give "
            "data=<held-out shards>"
        ) from err
