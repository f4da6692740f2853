"""Transform 1: can this input become training data at all? (streams, duration, audio presence)."""

from __future__ import annotations

import os

from data_jobs.media import probe_media
from data_jobs.pipeline import Sample, Transform


class Probe(Transform):
    name = "probe"

    def __call__(self, sample: Sample) -> Sample:
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
        if info.duration_s <= 0 or info.fps <= 0:
            return sample.fail(
                self.name, "zero_length", f"duration {info.duration_s:.3f} s", whole_input=True
            )
        if not sample.audio_path and not info.has_audio:
            return sample.fail(self.name, "no_audio", "no audio stream and no paired audio", whole_input=True)
        if sample.audio_path:
            try:
                if not probe_media(sample.audio_path).has_audio:
                    return sample.fail(self.name, "no_audio", "paired file has no audio", whole_input=True)
            except Exception as err:
                detail = f"paired audio unreadable: {type(err).__name__}: {err}"[:300]
                return sample.fail(self.name, "no_audio", detail, whole_input=True)
        return sample
