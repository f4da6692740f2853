"""Transform 3: shot boundaries (PySceneDetect's content detector on small frames) and 5-10 s
segments inside each shot, both decided as the frames stream past (see `data_jobs/ingest.py`).

A cut is reported on the frame where the new shot starts, with no look-ahead: the detector's
minimum scene length suppresses a second cut too soon after the last one instead of merging cuts
later. Segments are cut while the shot goes on: a full `max` piece as soon as at least `max + min`
frames of the shot are known, so that whatever remains can still form a segment; when the shot
ends, what is left (less than `max + min` frames) becomes one segment, or two equal ones when it is
longer than `max`. Shots shorter than the minimum are dropped with a reason.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scenedetect import ContentDetector
from scenedetect.common import FrameTimecode
from scenedetect.detector import FlashFilter

from data_jobs.config import IngestConfig
from data_jobs.pipeline import Reject, Sample, Transform


def split_tail(start: int, end: int, min_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """Equal segments covering [start, end), each within [min_frames, max_frames] frames.

    Empty when shorter than `min_frames`. When no equal split fits both bounds (only possible if
    max < 2 * min), segments of `max_frames` are cut and the remainder left out.
    """
    length = end - start
    if length < min_frames:
        return []
    count = math.ceil(length / max_frames)
    if length // count >= min_frames:
        bounds = np.linspace(start, end, count + 1).round().astype(int)
    else:
        count = length // max_frames
        bounds = start + max_frames * np.arange(count + 1)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def split_shot(start: int, end: int, min_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """The segments streaming ingest cuts from a shot [start, end): full `max_frames` pieces while
    at least `max_frames + min_frames` frames remain, then `split_tail` of the rest."""
    full = max(0, (end - start - min_frames) // max_frames)
    parts = [(start + i * max_frames, start + (i + 1) * max_frames) for i in range(full)]
    return parts + split_tail(start + full * max_frames, end, min_frames, max_frames)


def thumbnail(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`frame` shrunk to `size` (w, h). Area averaging over a whole large frame costs more than the
    cut detection itself, so a frame more than twice the size is first sampled bilinearly down to
    twice it, then area-averaged: each thumbnail pixel still averages a 2x2 neighbourhood."""
    width, height = size
    if frame.shape[1] > 2 * width and frame.shape[0] > 2 * height:
        frame = cv2.resize(frame, (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


class Shots(Transform):
    """Online cut detection on a downscaled copy of each timeline frame, and the segment rule."""

    name = "shots"

    def __init__(self, config: IngestConfig):
        self.config = config
        self._detector: ContentDetector | None = None
        self._size = (0, 0)
        self._fps = 25.0

    def frames_bounds(self, fps: float) -> tuple[int, int]:
        """Minimum and maximum segment length in timeline frames."""
        return (
            math.ceil(self.config.min_segment_s * fps - 1e-6),
            math.floor(self.config.max_segment_s * fps + 1e-6),
        )

    def begin(self, sample: Sample) -> None:
        """A fresh detector for one input."""
        self.start(sample.info.width, sample.info.height, sample.fps)

    def start(self, width: int, height: int, fps: float) -> None:
        """A fresh detector for frames of this size (the shot width keeps their aspect ratio)."""
        small = self.config.shot_width
        self._size, self._fps = (small, max(2, round(height * small / max(width, 1) / 2) * 2)), fps
        self._detector = ContentDetector(
            threshold=self.config.shot_threshold,
            min_scene_len=round(fps / 2),
            filter_mode=FlashFilter.Mode.SUPPRESS,
        )

    def is_cut(self, position: int, frame: np.ndarray) -> bool:
        """Whether a new shot starts at timeline frame `position` (frames come in order)."""
        small = thumbnail(frame, self._size)
        # PySceneDetect expects OpenCV's BGR order.
        found = self._detector.process_frame(FrameTimecode(position, self._fps), small[:, :, ::-1].copy())
        return position > 0 and any(int(c.frame_num) == position for c in found)

    def too_short(self, sample: Sample, start: int, end: int) -> None:
        """Record a shot that yields no segment."""
        detail = f"shot of {(end - start) / sample.fps:.2f} s < {self.config.min_segment_s} s"
        sample.rejects.append(Reject(self.name, "shot_too_short", detail, start / sample.fps, end / sample.fps))
