"""`make infer VIDEO=talk.mp4 AUDIO=speech.wav OUT=out.mp4`: lip-sync a video to new speech.

    python -m pipelines.infer video=talk.mp4 audio=speech.wav output=out.mp4 student_weights=models:/lipforcing-student@champion

1. The video is put on the 25 fps timeline, the audio resampled to 16 kHz. The output lasts as long as
   the audio (cut to the student's 4k+1 frames): a shorter video is played forward, then backward, and
   so on; a longer one is cut.
2. The face is found and tracked with the data job's tracker (`faces.*`), its landmarks smoothed over
   time, and each frame warped to the aligned crop exactly as the data job warps training crops
   (`align.*`), then resized to the model's size.
3. The student streams the crops chunk by chunk with the new audio (two calls per chunk, the KV
   cache), the first crop as its reference, as `make eval` runs it; each chunk is decoded (TAE or VAE).
4. Each generated crop goes back into its frame through the inverse warp, only its mouth box,
   feathered inside the box (`lipforcing/inference/paste.py`): every other pixel is the source's.
   With `parsing_weights` (a BiSeNet face parser) only face surface in the box is replaced:
   occluders stay in front, the mask feathered and averaged over neighbouring frames.
   Frames with no face nearby pass through unchanged. With several faces the tracker follows the one
   it acquired (the largest at a whole-frame search), so keep one speaker per shot.
5. The frames are encoded (H.264) with the new audio muxed in.

The clip is held in memory (source frames and crops): videos longer than `max_seconds` are refused
with that key named, and speech is read up to that length. An odd frame size gets its last row or
column repeated (H.264 needs even sizes). A tiny-profile student is random-init: its output shows the plumbing, not lip-sync.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
import torch

from data_jobs.align import similarity_transform, template_points
from data_jobs.config import AlignConfig, FacesConfig
from data_jobs.faces import Faces, LandmarkTrack
from data_jobs.media import (
    VideoFrames,
    cfr_indices,
    encode_mp4,
    probe_media,
    read_audio,
    timeline_frames,
    to_uint8,
)
from lipforcing import storage
from lipforcing.config import ClusterConfig, ConfigError
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.windows import WindowConfig, resize_frames
from lipforcing.inference.paste import blend_mask, crop_affine, occlusion_masks, paste
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
    max_seconds: float = 120.0  # the clip is held in memory: longer inputs are refused
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


def timeline(video: str, max_seconds: float) -> list[np.ndarray]:
    """The video's frames on the 25 fps timeline (RGB uint8), each source frame decoded once."""
    info = probe_media(video)
    if not info.has_video:
        raise ConfigError(f"config key 'video' is {video!r}, which has no video stream")
    reader = VideoFrames(video)
    try:
        timestamps = reader.timestamps()
    finally:
        reader.close()
    duration = float(timestamps[-1]) + 1.0 / (info.fps or FPS)
    if duration > max_seconds:
        raise ConfigError(f"the video lasts {duration:.0f} s, over config key 'max_seconds' ({max_seconds:g} s)")
    count = max(1, math.floor(duration * FPS + 0.01))
    return list(timeline_frames(video, cfr_indices(timestamps, FPS, 0.0, count)))


def output_sources(source_frames: int, output_frames: int) -> np.ndarray:
    """The source frame shown at each output frame: forward, backward, forward... (no frame twice in
    a row at the turns) until the output is long enough."""
    if source_frames == 1:
        return np.zeros(output_frames, int)
    period = 2 * source_frames - 2
    phase = np.arange(output_frames) % period
    return np.where(phase < source_frames, phase, period - phase)


def track(frames: list[np.ndarray], faces: FacesConfig, align: AlignConfig) -> tuple[np.ndarray, np.ndarray]:
    """([T, 2, 3] frame -> aligned-crop affines, [T] whether a face was found near each frame). One
    smoothed landmark track over the whole video (no shot cuts: one continuous take is expected);
    frames between detections take the interpolated landmarks."""
    height, width = frames[0].shape[:2]
    tracker = Faces(faces).tracker(width, height)
    landmarks = LandmarkTrack(0, faces.smooth_sigma)
    stride = max(1, faces.stride)
    found = []
    for position in range(0, len(frames), stride):
        face = tracker.detect(position, frames[position]).face
        if face is not None:
            landmarks.add(position, face.landmarks)
            found.append(position)
    # A frame is edited when a face was found within two detections of it: one missed detection
    # does not switch the edit off and on (the landmarks across it are interpolated anyway).
    near = np.zeros(len(frames) + 1, int)
    for position in found:
        near[max(0, position - 2 * stride + 1)] += 1
        near[min(len(frames), position + 2 * stride)] -= 1
    faced = np.cumsum(near)[: len(frames)] > 0
    if landmarks.empty:
        return np.zeros((len(frames), 2, 3)), faced
    template = template_points(align.template, align.size)
    affines = np.stack([similarity_transform(landmarks.smoothed(p, len(frames)), template) for p in range(len(frames))])
    return affines, faced


def aligned_crops(frames: list[np.ndarray], sources: np.ndarray, affines: np.ndarray, align: AlignConfig, size: int,
                  parser: BiSeNet | None = None) -> tuple[torch.Tensor, np.ndarray | None]:  # fmt: skip
    """([T, 3, S, S] crops in [0, 1], each shown frame warped as the data job warps it, then resized to
    the model's size as training windows are; with a face `parser`, [T_source, S, S] face-surface
    masks of the source frames at the crop's size, NaN for frames never shown)."""
    shown = np.unique(sources)
    warped, surface = {}, np.full((len(frames), size, size), np.nan, np.float32) if parser is not None else None
    for source in shown:
        crop = cv2.warpAffine(frames[source], affines[source], (align.size, align.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        warped[source] = resize_frames(crop[None], size)[0]
        if parser is not None:
            parsed = parser.surface(resize_frames(crop[None], align.size))[0].numpy()
            surface[source] = cv2.resize(parsed, (size, size), interpolation=cv2.INTER_AREA)
    return torch.stack([warped[s] for s in sources]), surface


def even(frame: np.ndarray) -> np.ndarray:
    """The frame with its last row / column repeated where its size is odd (H.264 in yuv420p needs even sizes)."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


@dataclass
class Lipsynced:
    """The output before encoding: frames (a generator: one at a time), the audio under them, the plan."""

    frames: Iterator[np.ndarray]  # [H, W, 3] uint8, the source frame with the mouth box pasted in (even sizes)
    audio: np.ndarray  # float32 at 16 kHz, exactly as long as the frames
    sources: np.ndarray  # [T] the source frame behind each output frame
    affines: np.ndarray  # [T_source, 2, 3] frame -> aligned crop
    faced: np.ndarray  # [T_source] whether the face was edited there
    student_fps: float


def synthesize(config: InferConfig, evaluator: Any = None) -> Lipsynced:
    """Steps 1-4 of the module docstring; `evaluator` (a built `pipelines.evaluate.Evaluator`, as the
    MLflow model holds) instead of loading `config.student_weights`."""
    from pipelines import tracking
    from pipelines.evaluate import EvalClip, EvalConfig, Evaluator

    validate(config)
    with contextlib.ExitStack() as stack:  # object-storage inputs are fetched once, to local files
        video = stack.enter_context(storage.temporary_local(config.video))
        speech = stack.enter_context(storage.temporary_local(config.audio)) if config.audio else video
        if not probe_media(speech).has_audio:
            key = "audio" if config.audio else "video"
            raise ConfigError(f"config key '{key}' is {getattr(config, key)!r}, which has no audio track: give the speech as audio=")
        frames = timeline(video, config.max_seconds)
        audio = read_audio(speech, SAMPLE_RATE, config.max_seconds)
    output_frames = (len(audio) // SAMPLES_PER_FRAME - 1) // 4 * 4 + 1  # the student's 4k+1 frames
    first_chunk = 4 * config.model.chunk_frames - 3
    if output_frames < first_chunk:
        raise ConfigError(f"the audio lasts {len(audio) / SAMPLE_RATE:.2f} s; the student's first chunk alone needs {first_chunk} frames")
    audio = np.ascontiguousarray(audio[: output_frames * SAMPLES_PER_FRAME], np.float32)
    sources = output_sources(len(frames), output_frames)
    log.info("%d source frames, %d output frames (%.1f s of audio); tracking the face", len(frames), output_frames, len(audio) / SAMPLE_RATE)
    affines, faced = track(frames, config.faces, config.align)
    if not faced.any():
        log.warning("no face found in %s: the output is the video with the new audio", config.video)
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    with tempfile.TemporaryDirectory(prefix="lipforcing-infer-") as scratch:
        if evaluator is None:
            tracking.setup_tracking()
            weights, _ = tracking.resolve_model(config.student_weights, scratch, "student_weights")
            settings = EvalConfig(profile=config.profile, decoder=config.decoder, seed=config.seed, window=config.window, model=config.model)
            evaluator = Evaluator(settings, weights, "", device)
        size = config.window.size
        parser = load_face_parser(config.parsing_weights).to(device) if config.parsing_weights else None
        crops, surface = aligned_crops(frames, sources, affines, config.align, size, parser)
        generation = evaluator.generate(EvalClip(storage.absolute(config.video), crops, torch.from_numpy(audio)))
        generated = to_uint8(generation.frames).numpy()  # [T, S, S, 3]
    box = blend_mask(size, config.window.mask_box, config.feather)
    masks = occlusion_masks(surface, box, config.feather) if surface is not None else None
    pasted = (
        even(paste(frames[s], generated[i], crop_affine(affines[s], config.align.size, size), box if masks is None else masks[s])
             if faced[s] else frames[s])
        for i, s in enumerate(sources)
    )  # fmt: skip
    return Lipsynced(pasted, audio, sources, affines, faced, generation.fps)


def write_video(output: str, frames: Iterable[np.ndarray], audio: np.ndarray) -> None:
    """Step 5: H.264 at 25 fps with the speech as AAC, to a path or object-storage URL."""
    storage.write_bytes(output, encode_mp4(frames, FPS, crf=18, audio=audio, sample_rate=SAMPLE_RATE))


def lipsync(config: InferConfig, evaluator: Any = None) -> Lipsynced:
    """The job: step 5 after `synthesize`, into `config.output`."""
    result = synthesize(config, evaluator)
    write_video(config.output, result.frames, result.audio)
    edited = float(result.faced[result.sources].mean())
    log.info("wrote %s: %d frames, face edited in %.0f%% of them, student %.1f fps", config.output, len(result.sources), 100 * edited, result.student_fps)
    return result


def main(config: InferConfig) -> int:
    lipsync(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_job("pipelines.infer", InferConfig, main, validate=validate))
