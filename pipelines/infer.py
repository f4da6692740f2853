"""`make infer VIDEO=talk.mp4 AUDIO=speech.wav OUT=out.mp4`: lip-sync a video to new speech.

    python -m pipelines.infer video=talk.mp4 audio=speech.wav output=out.mp4 student_weights=models:/lipforcing-student@champion

1. The video is put on the 25 fps timeline, the audio resampled to 16 kHz. The output lasts as long as
   the audio (cut to the student's 4k+1 frames): a shorter video is played forward, then backward, and
   so on; a longer one is cut.
2. A first pass over the video finds its shot cuts (the data job's detector) and tracks the face in
   each shot with the data job's tracker (`faces.*`), its landmarks smoothed over time within the
   shot; each frame is warped to the aligned crop exactly as the data job warps training crops
   (`align.*`), then resized to the model's size.
3. A second pass streams the crops chunk by chunk through the student with the new audio, one run
   at a time: a run is a stretch of output showing the face in one shot, streamed from its own first
   crop as the reference, with its own audio and a fresh KV cache (a cut to another person does not
   carry the last person's identity over). Each chunk's condition is encoded as it arrives (VAE
   stream encoders, wav2vec2 a window at a time), two calls per chunk, each chunk decoded (TAE or VAE).
4. Each generated crop goes back into its frame through the inverse warp, only its mouth box,
   feathered inside the box (`lipforcing/inference/paste.py`): every other pixel is the source's.
   With `parsing_weights` (a BiSeNet face parser) only face surface in the box is replaced:
   occluders stay in front, the mask feathered and averaged with the neighbouring frames' of the shot.
   Frames with no face nearby pass through unchanged, as do runs shorter than the student's first
   chunk (a run of another length than 1 + 4k frames is generated padded). With several faces the tracker
   follows the one it acquired in each shot (the largest at a whole-frame search).
5. The frames are encoded (H.264) as they come, with the new audio muxed in.

Memory does not grow with the length: the passes hold a few frames, the student's cache is rolling,
only the speech (3.8 MB a minute) and the per-frame warps are kept whole. Going backwards (a video
shorter than the speech) seeks to the keyframe before the frames it needs. An odd frame size gets its
last row or column repeated (H.264 needs even sizes). A tiny-profile student is random-init: its
output shows the plumbing, not lip-sync.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from data_jobs.align import similarity_transform, template_points
from data_jobs.config import AlignConfig, FacesConfig, IngestConfig
from data_jobs.faces import Faces, LandmarkTrack
from data_jobs.media import (
    VideoFrames,
    cfr_indices,
    probe_media,
    read_audio,
    timeline_frames,
    to_uint8,
    write_mp4,
)
from data_jobs.shots import Shots
from lipforcing import storage
from lipforcing.config import ClusterConfig, ConfigError
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.windows import WindowConfig, resize_frames
from lipforcing.inference.conditions import chunk_frame_counts
from lipforcing.inference.paste import blend_mask, crop_affine, occlusion_mask, paste
from lipforcing.models.config import ModelConfig
from lipforcing.models.face_parsing import BiSeNet, load_face_parser
from pipelines.jobs import run_job

log = logging.getLogger("lipforcing.infer")
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS


@dataclass
class InferConfig:
    profile: str = "tiny"
    video: str = ""  # the talking-head video (any file FFmpeg reads; a path or object-storage URL)
    audio: str = ""  # the new speech (any file FFmpeg reads); "" = the video's own audio track
    output: str = "outputs/infer/lipsync.mp4"
    student_weights: str = "models:/lipforcing-student@champion"  # a registered student or a path/URL
    decoder: Literal["tae", "vae"] = "tae"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    feather: float = 0.06  # width of the blend's fall-off inside the mouth box, as a share of the crop
    # PySceneDetect content threshold of the cut detector (as the data job's ingest.shot_threshold):
    # the face track restarts at each cut instead of being smoothed across it
    shot_threshold: float = 27.0
    # BiSeNet face parsing (CelebAMask-HQ, `79999_iter.pth`): the generated mouth replaces only face
    # surface, so a hand, a microphone, hair or glasses in front of it stay; "" = the mouth box alone
    parsing_weights: str = ""
    window: WindowConfig = field(default_factory=WindowConfig)  # size (the model's) and mask_box
    model: ModelConfig = field(default_factory=ModelConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)



def validate(config: InferConfig) -> None:
    if not config.video:
        raise ConfigError("config key 'video' is empty; allowed values: a video file (path or URL)")
    top, bottom, left, right = config.window.mask_box
    widest = min(bottom - top, right - left) / 4  # a wider fall-off leaves nothing of the box at full weight
    if not 0 < config.feather < widest:
        raise ConfigError(f"config key 'feather' is {config.feather}; allowed values: a share of the crop in (0, {widest:.3f})")


class SourceTimeline(NamedTuple):
    """The video on the 25 fps timeline, read once for both the tracking and the generation pass."""

    indices: np.ndarray  # the source frame index shown at each tick
    timestamps: np.ndarray  # each source frame's time (s): where a seek lands


def read_timeline(video: str) -> SourceTimeline:
    """The source frame shown at each tick of the video's 25 fps timeline, and the frames' timestamps."""
    info = probe_media(video)
    if not info.has_video:
        raise ConfigError(f"config key 'video' is {video!r}, which has no video stream")
    reader = VideoFrames(video)
    try:
        timestamps = reader.timestamps()
    finally:
        reader.close()
    duration = float(timestamps[-1]) + 1.0 / (info.fps or FPS)
    return SourceTimeline(cfr_indices(timestamps, FPS, 0.0, max(1, math.floor(duration * FPS + 0.01))), timestamps)


def output_sources(source_frames: int, output_frames: int) -> np.ndarray:
    """The source frame shown at each output frame: forward, backward, forward... (no frame twice in
    a row at the turns) until the output is long enough."""
    if source_frames == 1:
        return np.zeros(output_frames, int)
    period = 2 * source_frames - 2
    phase = np.arange(output_frames) % period
    return np.where(phase < source_frames, phase, period - phase)


@dataclass
class Track:
    """The first pass: per timeline frame, the warp to the aligned crop and whether a face is there."""

    affines: np.ndarray  # [T, 2, 3] frame -> aligned crop (zeros where a shot has no face)
    faced: np.ndarray  # [T] a face was found within two detections of the frame, in its shot
    cuts: list[int]  # timeline frames where a new shot starts


def track(video: str, indices: np.ndarray, faces: FacesConfig, align: AlignConfig, shot_threshold: float) -> Track:
    """One decode of the video: cut detection on every frame, face detection every `faces.stride`
    frames from each shot's start, landmarks smoothed within the shot. Holds landmarks, not frames."""
    template = template_points(align.template, align.size)
    stride = max(1, faces.stride)
    affines, faced = np.zeros((len(indices), 2, 3)), np.zeros(len(indices), bool)
    shots = Shots(IngestConfig(shot_threshold=shot_threshold))
    cuts: list[int] = []
    tracker, landmarks = None, LandmarkTrack(0, faces.smooth_sigma)
    shot_start, found = 0, []

    def close_shot(end: int) -> None:
        # A frame is edited when a face was found within two detections of it: one missed detection
        # does not switch the edit off and on (the landmarks across it are interpolated anyway).
        for position in found:
            faced[max(shot_start, position - 2 * stride + 1) : min(end, position + 2 * stride)] = True
        if not landmarks.empty:
            for position in range(shot_start, end):
                affines[position] = similarity_transform(landmarks.smoothed(position, end), template)

    for position, frame in enumerate(timeline_frames(video, indices)):
        if position == 0:
            height, width = frame.shape[:2]
            shots.start(width, height, float(FPS))
            tracker = Faces(faces).tracker(width, height)
        if shots.is_cut(position, frame):  # never at 0; the detector sees every frame
            close_shot(position)
            cuts.append(position)
            shot_start, found = position, []
            tracker.reset()
            landmarks = LandmarkTrack(position, faces.smooth_sigma)
        if (position - shot_start) % stride == 0:
            face = tracker.detect(position, frame).face
            if face is not None:
                landmarks.add(position, face.landmarks)
                found.append(position)
    close_shot(len(indices))
    return Track(affines, faced, cuts)


class TimelineReader:
    """Timeline frames by position for a pass that mostly moves forward: one sequential decode that
    holds the last `held` frames. A position behind them restarts the decode at the keyframe before
    it (a seek, not a decode from the start), so that it and the frames just before it are held."""

    def __init__(self, video: str, timeline: SourceTimeline, held: int = 25):
        self.video, self.indices, self.timestamps, self.keep = video, timeline.indices, timeline.timestamps, held
        self.held: dict[int, np.ndarray] = {}
        self.next, self.frames = 0, timeline_frames(video, self.indices)

    def __getitem__(self, position: int) -> np.ndarray:
        if position in self.held:
            return self.held[position]
        if position < self.next:
            self.close()
            self.next = max(0, position - self.keep + 1)
            self.frames = timeline_frames(self.video, self.indices[self.next :], timestamps=self.timestamps)
        while self.next <= position:
            self.held[self.next] = next(self.frames)
            self.held.pop(self.next - self.keep, None)
            self.next += 1
        return self.held[position]

    def close(self) -> None:
        self.frames.close()
        self.held.clear()


def aligned_crop(frame: np.ndarray, affine: np.ndarray, align: AlignConfig) -> np.ndarray:
    """The frame warped to the aligned crop exactly as the data job warps it ([A, A, 3] uint8)."""
    return cv2.warpAffine(frame, affine, (align.size, align.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


class SurfaceMasks:
    """Face-surface masks of timeline frames at the model's size, each parsed once while it is near."""

    def __init__(self, parser: BiSeNet, reader: TimelineReader, result: Lipsynced, align: AlignConfig, size: int):
        self.parser, self.reader, self.result, self.align, self.size = parser, reader, result, align, size
        self.shots = shot_index(result.cuts, np.arange(len(result.affines)))
        self.parsed: dict[int, np.ndarray] = {}

    def __call__(self, position: int) -> list[np.ndarray]:
        """The masks of the frame and its neighbours on the timeline that show the face in its shot."""
        near = [other for other in range(max(0, position - 1), min(len(self.shots), position + 2))
                if other == position or (self.shots[other] == self.shots[position] and self.result.faced[other])]  # fmt: skip
        for other in near:
            if other not in self.parsed:
                crop = aligned_crop(self.reader[other], self.result.affines[other], self.align)
                parsed = self.parser.surface(resize_frames(crop[None], self.align.size))[0].numpy()
                self.parsed[other] = cv2.resize(parsed, (self.size, self.size), interpolation=cv2.INTER_AREA)
        for other in [p for p in self.parsed if abs(p - position) > self.reader.keep]:
            del self.parsed[other]
        return [self.parsed[other] for other in near]


def shot_index(cuts: list[int], positions: np.ndarray) -> np.ndarray:
    """The shot (0, 1, ...) of each timeline position, given the positions where shots start."""
    return np.searchsorted(np.asarray(cuts, int), positions, side="right")


def edit_runs(result: Lipsynced, first_chunk: int) -> list[range]:
    """The output frames the student edits, as runs it streams one at a time, each with its own
    reference, audio and cache: consecutive output frames whose source shows the face, in one shot.
    Runs shorter than the student's first chunk pass through unedited (as frames without a face do)."""
    sources = result.sources
    key = np.where(result.faced[sources], shot_index(result.cuts, sources), -1)
    runs, start = [], 0
    for end in range(1, len(sources) + 1):
        if end == len(sources) or key[end] != key[end - 1]:
            if key[start] >= 0 and end - start >= first_chunk:
                runs.append(range(start, end))
            start = end
    return runs


def even(frame: np.ndarray) -> np.ndarray:
    """The frame with its last row / column repeated where its size is odd (H.264 in yuv420p needs even sizes)."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


@dataclass
class Lipsynced:
    """The output before encoding: frames (a generator: made as they are read), the audio under them, the plan."""

    frames: Iterator[np.ndarray]  # [H, W, 3] uint8, the source frame with the mouth box pasted in (even sizes)
    audio: np.ndarray  # float32 at 16 kHz, exactly as long as the frames
    sources: np.ndarray  # [T] the timeline frame behind each output frame
    affines: np.ndarray  # [T_source, 2, 3] frame -> aligned crop
    faced: np.ndarray  # [T_source] whether a face was found near the frame, in its shot (edited if its run is long enough)
    cuts: list[int]  # timeline frames where a new shot starts
    timing: dict[str, float] = field(default_factory=dict)  # filled as the frames are read
    close: Callable[[], None] = lambda: None  # ends the generation and frees its inputs, read or not

    @property
    def student_fps(self) -> float:
        """Frames the student generated per second of its streaming loop (encode, denoise, cache
        write, decode; not the paste-back and video encoding), once the frames are read."""
        return self.timing.get("frames", 0.0) / self.timing["student_s"] if self.timing.get("student_s") else float("nan")


@dataclass
class Prepared:
    """After the tracking pass: what the generation pass reads."""

    video: str  # a local file (object-storage inputs fetched)
    timeline: SourceTimeline
    result: Lipsynced
    evaluator: Any  # a `pipelines.evaluate.Evaluator`
    stack: contextlib.ExitStack  # fetched inputs and scratch space, closed after the generation pass


def synthesize(config: InferConfig, evaluator: Any = None) -> Lipsynced:
    """Steps 1-4 of the module docstring; `evaluator` (a built `pipelines.evaluate.Evaluator`, as the
    MLflow model holds) instead of loading `config.student_weights`. The tracking pass runs here; the
    generation runs as the returned frames are read."""
    prepared = prepare(config, evaluator)
    result = prepared.result
    result.frames = generate_frames(config, prepared)

    def close() -> None:
        result.frames.close()
        prepared.stack.close()  # also when the frames were never read

    result.close = close
    return result


def prepare(config: InferConfig, evaluator: Any = None) -> Prepared:
    """Steps 1-2: the inputs read and checked, the face tracked, the student loaded."""
    validate(config)
    stack = contextlib.ExitStack()  # object-storage inputs are fetched once, to local files
    try:
        video = stack.enter_context(storage.temporary_local(config.video))
        speech = stack.enter_context(storage.temporary_local(config.audio)) if config.audio else video
        if not probe_media(speech).has_audio:
            key = "audio" if config.audio else "video"
            raise ConfigError(f"config key '{key}' is {getattr(config, key)!r}, which has no audio track: give the speech as audio=")
        timeline = read_timeline(video)
        indices = timeline.indices
        audio = read_audio(speech, SAMPLE_RATE)
        output_frames = (len(audio) // SAMPLES_PER_FRAME - 1) // 4 * 4 + 1  # the student's 4k+1 frames
        first_chunk = 4 * config.model.chunk_frames - 3
        if output_frames < first_chunk:
            raise ConfigError(f"the audio lasts {len(audio) / SAMPLE_RATE:.2f} s; the student's first chunk alone needs {first_chunk} frames")
        audio = np.ascontiguousarray(audio[: output_frames * SAMPLES_PER_FRAME], np.float32)
        sources = output_sources(len(indices), output_frames)
        log.info("%d source frames, %d output frames (%.1f s of audio); tracking the face", len(indices), output_frames, len(audio) / SAMPLE_RATE)
        found = track(video, indices, config.faces, config.align, config.shot_threshold)
        if not found.faced.any():
            log.warning("no face found in %s: the output is the video with the new audio", config.video)
        if found.cuts:
            log.info("shot cuts at %s s: the face track restarts there", ", ".join(f"{c / FPS:.2f}" for c in found.cuts))
        if evaluator is None:
            evaluator = load_evaluator(config, stack)
    except BaseException:
        stack.close()
        raise
    result = Lipsynced(iter(()), audio, sources, found.affines, found.faced, found.cuts)
    return Prepared(video, timeline, result, evaluator, stack)


def load_evaluator(config: InferConfig, stack: contextlib.ExitStack) -> Any:
    """The student and its encoders and decoder, from `config.student_weights`."""
    from pipelines import tracking
    from pipelines.evaluate import EvalConfig, Evaluator
    from pipelines.student_model import sampling_timesteps

    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="lipforcing-infer-"))
    tracking.setup_tracking()
    weights, _ = tracking.resolve_model(config.student_weights, scratch, "student_weights")
    model = replace(config.model, student_timesteps=sampling_timesteps(config.student_weights, config.model.student_timesteps))
    settings = EvalConfig(profile=config.profile, decoder=config.decoder, seed=config.seed, window=config.window, model=model)
    return Evaluator(settings, weights, "", torch.device("cuda" if use_cuda else "cpu"))


@dataclass
class GeneratedChunk:
    span: range  # its output frames
    source: torch.Tensor  # [n, 3, S, S] the source crops in [0, 1] (the student's input)
    generated: torch.Tensor  # [n, 3, S, S] the student's crops in [0, 1], on the CPU


def generated_chunks(config: InferConfig, prepared: Prepared, reader: TimelineReader) -> Iterator[GeneratedChunk]:
    """Step 3: the edited runs in order (`edit_runs`), each streamed a chunk at a time from its own
    first crop; `result.timing` adds up the student's loop (`student_s`, `frames`)."""
    result = prepared.result
    result.timing.update(student_s=0.0, frames=0.0)
    for run in edit_runs(result, 4 * config.model.chunk_frames - 3):
        yield from run_chunks(config, prepared, reader, run)


def run_chunks(config: InferConfig, prepared: Prepared, reader: TimelineReader, run: range) -> Iterator[GeneratedChunk]:
    """One run through the student: its crops chunk by chunk, its audio, its first crop as reference.
    The student makes 1 + 4k frames: a run of another length is streamed padded up to that (its last
    crop repeated, the speech after it, silence past the end) and the padding dropped."""
    result, size = prepared.result, config.window.size
    padded = -(-(len(run) - 1) // 4) * 4 + 1
    counts = chunk_frame_counts(padded, config.model.chunk_frames)
    bounds = run.start + np.cumsum([0, *counts])
    pending: collections.deque[tuple[range, torch.Tensor]] = collections.deque()

    def crops(span: range) -> torch.Tensor:
        shown = result.sources[[min(i, run.stop - 1) for i in span]]
        return resize_frames(np.stack([aligned_crop(reader[s], result.affines[s], config.align) for s in shown]), size)

    def chunks() -> Iterator[torch.Tensor]:
        for start, stop in zip(bounds[:-1], bounds[1:]):
            pending.append((range(start, min(stop, run.stop)), crops(range(start, stop))))
            yield pending[-1][1]

    speech = result.audio[run.start * SAMPLES_PER_FRAME : (run.start + padded) * SAMPLES_PER_FRAME]
    audio = torch.from_numpy(np.pad(speech, (0, padded * SAMPLES_PER_FRAME - len(speech))))
    stream = prepared.evaluator.stream(chunks(), crops(run[:1])[0], audio, padded, result.timing)
    while True:
        start = time.perf_counter()
        chunk = next(stream, None)
        result.timing["student_s"] += time.perf_counter() - start
        if chunk is None:
            return
        span, source = pending.popleft()
        result.timing["frames"] += len(span)
        yield GeneratedChunk(span, source[: len(span)], chunk.frames[0, : len(span)].cpu())


def generate_frames(config: InferConfig, prepared: Prepared) -> Iterator[np.ndarray]:
    """Step 4 over step 3: the output frames in order, edited runs pasted, the rest passed through."""
    with prepared.stack as stack:
        result, size = prepared.result, config.window.size
        reader = TimelineReader(prepared.video, prepared.timeline, held=held_frames(config))
        stack.callback(reader.close)
        parser = load_face_parser(config.parsing_weights).to(prepared.evaluator.device) if config.parsing_weights else None
        surfaces = SurfaceMasks(parser, reader, result, config.align, size) if parser is not None else None
        box = blend_mask(size, config.window.mask_box, config.feather)
        progress = stack.enter_context(tqdm(total=len(result.sources), unit="frame", desc="lip-sync", disable=None))
        position = 0  # the next output frame
        for chunk in generated_chunks(config, prepared, reader):
            for i in range(position, chunk.span.start):  # not edited: the source frame
                yield even(reader[result.sources[i]])
            for i, crop in zip(chunk.span, to_uint8(chunk.generated).numpy()):
                s = result.sources[i]
                mask = box if surfaces is None else occlusion_mask(surfaces(s), box, config.feather)
                yield even(paste(reader[s], crop, crop_affine(result.affines[s], config.align.size, size), mask))
            progress.update(chunk.span.stop - position)
            position = chunk.span.stop
        for i in range(position, len(result.sources)):
            yield even(reader[result.sources[i]])
        progress.update(len(result.sources) - position)


def held_frames(config: InferConfig) -> int:
    """Timeline frames the generation pass keeps decoded: a second, and at least two chunks and the
    face parser's neighbours, so pasting a chunk never decodes its frames again."""
    return max(FPS, 8 * config.model.chunk_frames + 2)


def write_video(output: str, frames: Iterable[np.ndarray], audio: np.ndarray) -> None:
    """Step 5: H.264 at 25 fps with the speech as AAC, written as the frames come, to a path or
    object-storage URL (visible only once complete)."""
    with storage.atomic_open(output) as handle:
        write_mp4(handle, frames, FPS, crf=18, audio=audio, sample_rate=SAMPLE_RATE)


def lipsync(config: InferConfig, evaluator: Any = None) -> Lipsynced:
    """The job: step 5 after `synthesize`, into `config.output`."""
    result = synthesize(config, evaluator)
    try:
        write_video(config.output, result.frames, result.audio)
    finally:
        result.close()
    edited = float(result.faced[result.sources].mean())
    log.info("wrote %s: %d frames, face edited in %.0f%% of them, student %.1f fps", config.output, len(result.sources), 100 * edited, result.student_fps)
    return result


def main(config: InferConfig) -> int:
    lipsync(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_job("pipelines.infer", InferConfig, main, validate=validate))
