"""What flows between ingest transforms, and how a list of them runs on it.

Every ingest stage is a small `Transform` whose `__call__(sample) -> sample` either fills in more of
the sample or marks it failed with a reason (`sample.fail(...)`); it never raises for bad input.
Input-level stages (probe, resample) see one whole input file; then one streaming pass over its
frames (shots, face tracking, the warp: `ingest.SegmentStream`, whose stages record reasons the
same way) cuts it into segments, and segment-level stages (faces, iqa, encode) see one segment
each. An exception escaping a stage is still turned into a reject (reason `error`), so one odd
file can never kill a shard.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_jobs.media import MediaInfo
from lipforcing.data import FPS, SAMPLE_RATE


@dataclass
class Reject:
    stage: str
    reason: str
    detail: str = ""
    start_s: float | None = None
    end_s: float | None = None


@dataclass
class Sample:
    """One input file, or (after `segment`) one 5-10 s segment of it."""

    source: str
    dataset: str
    key_stem: str
    audio_source: str | None = None
    identity: str = ""  # who is on screen (see data_jobs/inputs.py)
    split: str = "train"  # or "heldout": which shard set the job writes it to
    # Local copies the decoders read (object-store inputs are downloaded once per input).
    video_path: str = ""
    audio_path: str = ""
    info: MediaInfo | None = None
    # Source frame start times and the constant-rate timeline built on them.
    timestamps: np.ndarray | None = None
    fps: float = float(FPS)
    num_frames: int = 0
    sample_rate: int = SAMPLE_RATE
    audio: np.ndarray | None = None
    segments: list[tuple[int, int]] = field(default_factory=list)
    # Segment-level fields: frames [start_frame, end_frame) of the constant-rate timeline.
    start_frame: int = 0
    end_frame: int = 0
    # The face tracker's findings at this segment's detection frames (`faces.Detection`).
    detections: list[Any] = field(default_factory=list)
    landmarks: np.ndarray | None = None
    face_stats: dict[str, Any] = field(default_factory=dict)
    affines: np.ndarray | None = None
    frames: np.ndarray | None = None
    iqa: float | None = None
    sync_conf: float | None = None
    av_offset: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, bytes] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    failed: bool = False

    @property
    def key(self) -> str:
        return f"{self.key_stem}-{self.start_frame:06d}"

    @property
    def start_s(self) -> float:
        return self.start_frame / self.fps

    @property
    def end_s(self) -> float:
        return self.end_frame / self.fps

    def fail(self, stage: str, reason: str, detail: str = "", whole_input: bool = False) -> Sample:
        times = (None, None) if whole_input else (self.start_s, self.end_s)
        self.rejects.append(Reject(stage, reason, detail, *times))
        self.failed = True
        return self

    def segment(self, start_frame: int, end_frame: int) -> Sample:
        """A segment sample sharing the decoders' inputs, with its own audio slice and no rejects."""
        begin = round(start_frame / self.fps * self.sample_rate)
        length = round((end_frame - start_frame) / self.fps * self.sample_rate)
        audio = self.audio[begin : begin + length]
        audio = np.pad(audio, (0, length - len(audio)))
        return dataclasses.replace(
            self,
            start_frame=start_frame,
            end_frame=end_frame,
            audio=audio,
            segments=[],
            detections=[],
            rejects=[],
            outputs={},
            metadata={},
        )


class Transform:
    """Base of every ingest stage: a name (the `stage` column of rejects) and `__call__`. (Not the
    trainer's `Stage`, which is a training stage.)"""

    name = "stage"

    def __call__(self, sample: Sample) -> Sample:
        raise NotImplementedError


def run_stages(sample: Sample, stages: Sequence[Transform], timings: dict[str, float]) -> Sample:
    """Apply stages in order until one fails; accumulate seconds spent per stage in `timings`."""
    for stage in stages:
        started = time.perf_counter()
        try:
            sample = stage(sample)
        except Exception as err:  # a bug or a decoder surprise on one input: record it, keep going
            whole = sample.end_frame == 0
            detail = f"{type(err).__name__}: {err} | {traceback.format_exc(limit=2).splitlines()[-1]}"
            sample.fail(stage.name, "error", detail[:500], whole_input=whole)
        timings[stage.name] = timings.get(stage.name, 0.0) + time.perf_counter() - started
        if sample.failed:
            break
    return sample

