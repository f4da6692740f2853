"""Transform 3: shot boundaries (PySceneDetect's content detector on small frames), then 5-10 s
segments inside each shot. Shots shorter than the minimum are dropped with a reason; long shots
are cut into equal segments, as few as fit under the maximum.
"""

from __future__ import annotations

import math

import numpy as np
from scenedetect import ContentDetector
from scenedetect.common import FrameTimecode

from data_jobs.config import IngestConfig
from data_jobs.media import VideoFrames, cfr_indices
from data_jobs.pipeline import Reject, Sample, Transform, chunked

CHUNK_FRAMES = 64


def split_shot(start: int, end: int, min_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """Equal segments covering [start, end), each within [min_frames, max_frames] frames.

    Empty when the shot is shorter than `min_frames`. When no equal split fits both bounds (only
    possible if max < 2 * min), segments of `max_frames` are cut and the remainder left out.
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


class Shots(Transform):
    name = "shots"

    def __init__(self, config: IngestConfig):
        self.config = config

    def __call__(self, sample: Sample) -> Sample:
        cuts = self.detect_cuts(sample)
        min_frames = math.ceil(self.config.min_segment_s * sample.fps - 1e-6)
        max_frames = math.floor(self.config.max_segment_s * sample.fps + 1e-6)
        edges = [0, *cuts, sample.num_frames]
        for start, end in zip(edges[:-1], edges[1:]):
            parts = split_shot(start, end, min_frames, max_frames)
            if not parts:
                detail = f"shot of {(end - start) / sample.fps:.2f} s < {self.config.min_segment_s} s"
                sample.rejects.append(
                    Reject(self.name, "shot_too_short", detail, start / sample.fps, end / sample.fps)
                )
            sample.segments.extend(parts)
        return sample

    def detect_cuts(self, sample: Sample) -> list[int]:
        """Timeline frame numbers where a new shot starts."""
        width = self.config.shot_width
        height = max(2, round(sample.info.height * width / max(sample.info.width, 1) / 2) * 2)
        detector = ContentDetector(threshold=self.config.shot_threshold, min_scene_len=round(sample.fps / 2))
        indices = cfr_indices(sample.timestamps, sample.fps, 0.0, sample.num_frames)
        reader = VideoFrames(sample.video_path, width=width, height=height)
        cuts: list[int] = []
        try:
            for positions in chunked(range(sample.num_frames), CHUNK_FRAMES):
                frames = reader.read(indices[positions.start : positions.stop])
                for position, frame in zip(positions, frames):
                    # PySceneDetect expects OpenCV's BGR order.
                    found = detector.process_frame(
                        FrameTimecode(position, sample.fps), frame[:, :, ::-1].copy()
                    )
                    cuts.extend(int(c.frame_num) for c in found)
        finally:
            reader.close()
        return sorted(c for c in set(cuts) if 0 < c < sample.num_frames)
