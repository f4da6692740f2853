"""Transform 2: put every input on the same clock: a 25 fps constant-rate timeline and 16 kHz mono.

Video frames are not decoded here: the timeline is a map from output frame to the source frame
on screen at that instant (frame-exact with VFR sources), and later stages decode only the frames
of the segment they work on. Audio is decoded and resampled up to the video's end, into one
buffer (`read_audio`); a stream FFmpeg cannot decode is rejected as `audio_corrupt`, since a gap
of silence inside speech would teach the model wrong lip motion.
"""

from __future__ import annotations

import math

from data_jobs.config import IngestConfig
from data_jobs.media import AudioDecodeError, VideoFrames, read_audio
from data_jobs.pipeline import Sample, Transform

# decord's timestamps are float32 (about 1e-7 relative: 0.2 ms an hour in): a timeline frame that
# ends within this fraction of a frame of the input's end still counts.
TICK_SLACK = 0.01


class Resample(Transform):
    name = "resample"

    def __init__(self, config: IngestConfig):
        self.config = config

    def __call__(self, sample: Sample) -> Sample:
        reader = VideoFrames(sample.video_path)
        try:
            timestamps = reader.timestamps()
        finally:
            reader.close()
        if len(timestamps) == 0:
            return sample.fail(self.name, "zero_length", "no decodable video frames", whole_input=True)
        frame_duration = 1.0 / sample.info.fps
        video_s = float(timestamps[-1]) + frame_duration
        try:
            audio = read_audio(sample.audio_path or sample.video_path, self.config.sample_rate, video_s)
        except AudioDecodeError as err:
            return sample.fail(self.name, "audio_corrupt", str(err)[:300], whole_input=True)
        audio_s = len(audio) / self.config.sample_rate
        duration = min(video_s, audio_s)
        if duration <= 0:
            return sample.fail(
                self.name, "zero_length", f"video {video_s:.2f} s, audio {audio_s:.2f} s", True
            )
        sample.timestamps = timestamps
        sample.fps = self.config.fps
        sample.sample_rate = self.config.sample_rate
        sample.num_frames = math.floor(duration * self.config.fps + TICK_SLACK)
        sample.audio = audio
        return sample
