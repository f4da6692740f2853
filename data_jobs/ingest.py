"""One task's ingest: each input through the input stages, its frames through one streaming pass,
each finished segment through the segment stages, into the task's shard writer. The job
(`job.py`) decides which inputs form a task and commits what this returns.

Ingest transforms, in order:
  per input:    probe -> resample
  per frame:    decode (once, sequentially, on the 25 fps timeline) -> shots (a cut here?) ->
                faces (track the face, every `faces.stride` frames) -> align (warp, once the
                frame's smoothed landmarks are final)
  per segment:  faces (judge its detections) -> iqa -> encode -> shard writer

Memory per input is bounded whatever its length: the crops of at most one full segment and a
minimum one (a full segment is cut once the shot is known to go on long enough for another),
plus a short look-ahead of source frames waiting for the detections their smoothed landmarks need.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_jobs.align import Align
from data_jobs.config import DataJobConfig
from data_jobs.faces import Faces, LandmarkTrack
from data_jobs.inputs import InputItem
from data_jobs.iqa import Iqa
from data_jobs.manifest import manifest_row, reject_row
from data_jobs.media import cfr_indices, timeline_frames
from data_jobs.pipeline import Reject, Sample, Transform, run_stages
from data_jobs.probe import Probe
from data_jobs.resample import Resample
from data_jobs.shots import Shots, split_tail
from data_jobs.writer import Encode
from lipforcing import storage

# Stage names in pipeline order (the summary's timing table follows it).
STAGE_ORDER = ("probe", "resample", "decode", "shots", "faces", "align", "iqa", "encode", "upload", "score")


def input_stages(config: DataJobConfig) -> list[Transform]:
    return [Probe(config.ingest), Resample(config.ingest)]


def segment_stages(config: DataJobConfig, digest: str, device: str = "cpu") -> list[Transform]:
    return [Faces(config.faces, device), Iqa(config.iqa, device), Encode(config.write, digest)]


class StageClock:
    """Adds the seconds spent inside `with clock(stage):` to `timings[stage]`; remembers the stage
    running now, so an error in the streaming pass is recorded under the stage that raised it."""

    def __init__(self, timings: dict[str, float]):
        self.timings, self.stage = timings, ""

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.stage, started = stage, time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started


class SegmentStream:
    """One decode of an input, each timeline frame through shots, face tracking and the warp;
    yields every segment (crops, affines, landmarks, detections) as soon as it is complete. Shots
    too short for a segment are recorded on the input sample's rejects.

    Crops are warped into one buffer of `max + min` segment frames, reused from input to input:
    a segment's `frames` is a view of it, valid until the stream is resumed (the segment stages
    run, and encode, before that)."""

    def __init__(self, shots: Shots, faces: Faces, align: Align, clock: StageClock):
        self.shots, self.faces, self.align, self.clock = shots, faces, align, clock
        self.stride = max(1, faces.config.stride)
        self.buffer = np.empty((0, 0, 0, 3), np.uint8)

    def __call__(self, sample: Sample) -> Iterator[Sample]:
        self.sample, self.segment_start = sample, 0
        self.min_frames, self.max_frames = self.shots.frames_bounds(sample.fps)
        size = self.align.config.size
        if self.buffer.shape[:3] != (self.max_frames + self.min_frames, size, size):
            self.buffer = np.empty((self.max_frames + self.min_frames, size, size, 3), np.uint8)
        self.shots.begin(sample)
        self.tracker = self.faces.tracker(sample.info.width, sample.info.height)
        self._start_shot(0)
        # A frame's smoothed landmarks need the detection after the end of its smoothing window.
        lookahead = self.track.radius + self.stride - 1
        indices = cfr_indices(sample.timestamps, sample.fps, 0.0, sample.num_frames)
        frames = timeline_frames(sample.video_path, indices)
        try:
            for position in range(sample.num_frames):
                with self.clock("decode"):
                    frame = next(frames)
                with self.clock("shots"):
                    cut = self.shots.is_cut(position, frame)
                if cut:
                    yield from self._end_shot(position)
                    self._start_shot(position)
                if (position - self.shot_start) % self.stride == 0:
                    with self.clock("faces"):
                        self._detect(position, frame)
                self.pending.append((position, frame))
                # Before any face is found in the shot, frames wait a little longer for one.
                wait = 2 * lookahead if self.track.empty else lookahead
                while self.pending and self.pending[0][0] + wait <= position:
                    yield from self._warp_next(position + 1)
            yield from self._end_shot(sample.num_frames)
        finally:
            frames.close()

    def unfinished(self) -> tuple[int, int]:
        """The timeline frames not yet handed out as segments (what an error leaves undone)."""
        return self.segment_start, self.sample.num_frames

    def _start_shot(self, start: int) -> None:
        self.shot_start = self.segment_start = start
        self.track = LandmarkTrack(start, self.faces.config.smooth_sigma)
        self.tracker.reset()
        self.pending: deque[tuple[int, np.ndarray]] = deque()
        # Per buffered frame from `segment_start` on (None: warped before any face was found).
        self.detections, self.affines, self.landmarks = [], [], []

    def _detect(self, position: int, frame: np.ndarray) -> None:
        detection = self.tracker.detect(position, frame)
        self.detections.append(detection)
        if detection.face is not None:
            self.track.add(position, detection.face.landmarks)

    def _warp_next(self, known_end: int) -> Iterator[Sample]:
        """Warp the oldest waiting frame; cut a full segment once the shot has room for another."""
        position, frame = self.pending.popleft()
        slot = position - self.segment_start
        with self.clock("align"):
            if self.track.empty:  # no face found in time: the segment is judged face_missing
                landmarks = affine = None
            else:
                landmarks = self.track.smoothed(position, known_end)
                affine = self.align.warp(frame, landmarks, self.buffer[slot])
            self.affines.append(affine)
            self.landmarks.append(landmarks)
        if slot + 1 == self.max_frames + self.min_frames:
            yield self._segment(self.segment_start, self.segment_start + self.max_frames)
            with self.clock("align"):  # the segment is done with: its successor's crops move up
                kept = len(self.landmarks)
                self.buffer[:kept] = self.buffer[self.max_frames : self.max_frames + kept]

    def _end_shot(self, end: int) -> Iterator[Sample]:
        while self.pending:
            yield from self._warp_next(end)
        parts = split_tail(self.segment_start, end, self.min_frames, self.max_frames)
        if not parts and self.segment_start == self.shot_start and end > self.shot_start:
            self.shots.too_short(self.sample, self.shot_start, end)
        offset = self.segment_start
        for start, stop in parts:
            yield self._segment(start, stop, start - offset)

    def _segment(self, start: int, end: int, slot: int = 0) -> Sample:
        """The segment [start, end), its crops at `slot` of the buffer; drops its bookkeeping."""
        count = end - start
        segment = self.sample.segment(start, end)
        segment.detections = [d for d in self.detections if start <= d.position < end]
        self.detections = [d for d in self.detections if d.position >= end]
        affines, landmarks = self.affines[:count], self.landmarks[:count]
        del self.affines[:count], self.landmarks[:count]
        if all(a is not None for a in affines):
            segment.frames = self.buffer[slot : slot + count]
            segment.affines = np.stack(affines).astype(np.float32)
            segment.landmarks = np.stack(landmarks)
        self.segment_start = end
        self.track.forget_before(end)
        return segment


@dataclass
class IngestResult:
    samples: list[dict[str, Any]] = field(default_factory=list)  # manifest rows
    rejects: list[dict[str, Any]] = field(default_factory=list)  # reject rows
    timings_s: dict[str, float] = field(default_factory=dict)
    clip_seconds_in: float = 0.0


def ingest_inputs(
    items: list[InputItem], config: DataJobConfig, digest: str, write: Callable[[InputItem, str, dict[str, bytes]], str],
    device: str = "cpu",
) -> IngestResult:
    """Run every input of a task; `write(item, key, members)` stores one sample, returns its shard.
    `device` is where the face and IQA models run."""
    result = IngestResult()
    per_input, per_segment = input_stages(config), segment_stages(config, digest, device)
    clock = StageClock(result.timings_s)
    stream = SegmentStream(Shots(config.ingest), Faces(config.faces, device), Align(config.align), clock)
    for item in items:
        sample = Sample(
            source=item.video, dataset=item.dataset, key_stem=item.key_stem, audio_source=item.audio,
            identity=item.identity, split=item.split,
        )
        if item.problem:  # a duplicate or an unsupported file (see InputItem): reported, never opened
            sample.fail("input", *item.problem.split(": ", 1), whole_input=True)
            result.rejects.append(reject_row(sample, sample.rejects[0]))
            continue
        with _local_inputs(sample, result.timings_s) as sample:
            if not sample.failed:
                sample = run_stages(sample, per_input, result.timings_s)
            result.clip_seconds_in += sample.info.duration_s if sample.info else 0.0
            if not sample.failed:
                try:
                    for segment in stream(sample):
                        segment = run_stages(segment, per_segment, result.timings_s)
                        result.rejects += [reject_row(segment, r) for r in segment.rejects]
                        if not segment.failed:
                            shard = write(item, segment.key, segment.outputs)
                            result.samples.append(manifest_row(segment.metadata, shard))
                except Exception as err:  # a decoder surprise mid-file: the rest of this input only
                    start, end = stream.unfinished()
                    detail = f"{type(err).__name__}: {err}"[:500]
                    sample.rejects.append(Reject(clock.stage, "error", detail, start / sample.fps, end / sample.fps))
            result.rejects += [reject_row(sample, r) for r in sample.rejects]
    return result


@contextlib.contextmanager
def _local_inputs(sample: Sample, timings: dict[str, float]):
    """Local copies of the video and its paired audio for the decoders (download counts as probe)."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        try:
            sample.video_path = stack.enter_context(storage.temporary_local(sample.source))
            if sample.audio_source:
                sample.audio_path = stack.enter_context(storage.temporary_local(sample.audio_source))
        except FileNotFoundError as err:  # listed, then gone: the same reason a missing local file gets
            sample.fail("probe", "missing_file", f"{err}"[:300], True)
        except Exception as err:  # permission, network past its retries: this input only
            sample.fail("probe", "unreadable", f"download failed: {type(err).__name__}: {err}"[:300], True)
        timings["probe"] = timings.get("probe", 0.0) + time.perf_counter() - started
        yield sample
