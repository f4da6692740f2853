"""Transform 1: can this input become training data at all? (streams, size, duration, audio).

Everything here reads headers only, so a bad input is rejected before any decoding: missing or
empty files, files FFmpeg cannot parse, no video stream, frames smaller than `ingest.min_side`,
no duration, longer than `ingest.max_duration_s`, and no audio (or a paired audio file that is
missing or unreadable). A corrupt audio stream inside a readable container only shows when
decoded: the resample stage rejects it.
"""

from __future__ import annotations

import os

from data_jobs.config import IngestConfig
from data_jobs.media import probe_media
from data_jobs.pipeline import Sample, Transform


class Probe(Transform):
    name = "probe"

    def __init__(self, config: IngestConfig):
        self.config = config

    def __call__(self, sample: Sample) -> Sample:
        if not os.path.exists(sample.video_path):
            detail = f"video {sample.source} does not exist"
            return sample.fail(self.name, "missing_file", detail, whole_input=True)
        if os.path.getsize(sample.video_path) == 0:
            return sample.fail(self.name, "empty_file", "0 bytes", whole_input=True)
        try:
            info = probe_media(sample.video_path)
        except Exception as err:  # FFmpeg can't parse it: truncated, not a video, wrong extension
            return sample.fail(
                self.name, "unreadable", f"{type(err).__name__}: {err}"[:300], whole_input=True
            )
        sample.info = info
        if not info.has_video:
            return sample.fail(self.name, "no_video", "no video stream", whole_input=True)
        if min(info.width, info.height) < self.config.min_side:
            detail = f"{info.width}x{info.height}; ingest.min_side is {self.config.min_side}"
            return sample.fail(self.name, "resolution_too_small", detail, whole_input=True)
        if info.duration_s <= 0 or info.fps <= 0:
            return sample.fail(
                self.name, "zero_length", f"duration {info.duration_s:.3f} s", whole_input=True
            )
        if info.duration_s > self.config.max_duration_s:
            detail = f"{info.duration_s:.1f} s; ingest.max_duration_s is {self.config.max_duration_s:g}"
            return sample.fail(self.name, "too_long", detail, whole_input=True)
        if sample.audio_path:
            return self._paired_audio(sample)
        if not info.has_audio:
            return sample.fail(self.name, "no_audio", "no audio stream and no paired audio", whole_input=True)
        return sample

    def _paired_audio(self, sample: Sample) -> Sample:
        if not os.path.exists(sample.audio_path):
            detail = f"paired audio {sample.audio_source} does not exist"
            return sample.fail(self.name, "missing_file", detail, whole_input=True)
        try:
            has_audio = probe_media(sample.audio_path).has_audio
        except Exception as err:  # garbage bytes, a truncated header
            detail = f"paired audio: {type(err).__name__}: {err}"[:300]
            return sample.fail(self.name, "audio_unreadable", detail, whole_input=True)
        if not has_audio:
            return sample.fail(self.name, "no_audio", "paired file has no audio stream", whole_input=True)
        return sample
