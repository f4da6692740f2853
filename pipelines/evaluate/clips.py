"""The clips `make eval` scores: held-out shards cut to what the student generates."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lipforcing.config import ConfigError
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.shards import Clip, Reader, decode_clip, epoch_samples, shard_urls
from lipforcing.data.windows import resize_frames
from pipelines.evaluate.config import EvalConfig


@dataclass(frozen=True)
class Placement:
    """Where a clip's crops came from: the source video and, per frame, the data job's warp."""

    source: str  # the raw input (path or URL), as the manifest names it
    start_s: float  # the clip's first frame on the source's 25 fps timeline
    affines: np.ndarray  # [T, 2, 3] source pixels -> aligned-crop pixels
    aligned_size: int  # the aligned crops' size (the data job's align.size)


@dataclass
class EvalClip:
    """One clip cut to what is evaluated: frames resized to the model's size, audio under them."""

    key: str
    video: Tensor  # [T, 3, S, S] in [0, 1], T = 4k + 1
    audio: Tensor  # [T * 640] float32, 16 kHz
    placement: Placement | None = None  # None: crops without their source (no full-frame metrics)
    identity: str = ""  # who is on screen (the manifest's identity, else the source video)


def eval_clips(shards: list[str], config: EvalConfig, min_frames: int, skipped: list[dict[str, str]]) -> Iterator[EvalClip]:
    """Up to `config.clips` clips in the seed's shard order, one at a time (a clip at 512 px is most
    of a gigabyte); the ones skipped go to `skipped` with why."""
    count = 0
    for sample in epoch_samples(shards, Reader(), seed=config.seed, epoch=0):
        if count >= config.clips:
            break
        decoded = decode_clip(sample)
        clip = prepare_clip(decoded, config.window.size, min_frames, config.max_frames)
        if isinstance(clip, str):
            skipped.append({"key": sample["__key__"], "reason": clip})
            continue
        clip.identity = str(decoded.metadata.get("identity") or decoded.metadata.get("source") or clip.key)
        if "affine.npy" in sample and decoded.metadata.get("source"):
            affines = np.load(io.BytesIO(sample["affine.npy"]))[: len(clip.video)]
            clip.placement = Placement(decoded.metadata["source"], float(decoded.metadata.get("start_s", 0.0)), affines, decoded.frames.shape[1])
        count += 1
        yield clip


def with_other_audio(clips: list[EvalClip]) -> list[EvalClip]:
    """Cross-identity (all clips held at once): each clip driven by the audio of the next clip showing someone else (clips of
    one video lie together in a shard, so the very next one is usually the same person), both cut to
    the shorter (4k + 1 frames), so the student must follow speech the face never said."""
    paired = []
    for index, clip in enumerate(clips):
        others = [clips[(index + step) % len(clips)] for step in range(1, len(clips))]
        other = next((o for o in others if o.identity != clip.identity), None)
        if other is None:
            raise ConfigError(f"config key 'audio_from' is 'other' but the {len(clips)} clips evaluated all show "
                              f"{clip.identity!r}; it needs clips of two identities (raise 'clips')")  # fmt: skip
        frames = (min(len(clip.video), len(other.video)) - 1) // 4 * 4 + 1
        placement = clip.placement
        if placement is not None:
            placement = Placement(placement.source, placement.start_s, placement.affines[:frames], placement.aligned_size)
        audio = other.audio[: frames * (SAMPLE_RATE // FPS)]
        paired.append(EvalClip(f"{clip.key}.audio-{other.key}", clip.video[:frames], audio, placement, clip.identity))
    return paired


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
