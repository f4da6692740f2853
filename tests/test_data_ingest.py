"""Streaming ingest (`data_jobs/ingest.py`) on real encoded clips with the real dlib backend: the
segments it cuts as the shot goes, its bounded memory on a long input, and faces far smaller than
the frame (a half-body portrait video).
"""

from __future__ import annotations

import io
import json

import av
import cv2
import numpy as np
import pytest

from data_jobs.align import Align, apply_affine, template_points
from data_jobs.config import DataJobConfig
from data_jobs.faces import DlibBackend, Faces, face_backend
from data_jobs.ingest import SegmentStream, StageClock, ingest_inputs, input_stages
from data_jobs.inputs import InputItem
from data_jobs.iqa import iqa_scorer, sharpness_score
from data_jobs.media import encode_mp4, read_audio
from data_jobs.pipeline import Sample, run_stages
from data_jobs.sample import ClipSpec, encode_clip
from data_jobs.shots import Shots, split_shot
from lipforcing.data.shards import decode_mp4
from pipelines.jobs import resolve_config
from tests.conftest import REAL_DATA


def ingest(path, *overrides: str):
    """Ingest one local clip; returns (result, {key: members})."""
    config = resolve_config(DataJobConfig, ["profile=tiny", *overrides])
    written: dict[str, dict[str, bytes]] = {}

    def write(item, key, members):
        written[key] = members
        return "shard"

    item = InputItem(video=str(path), audio=None, dataset="test", key_stem="clip")
    return ingest_inputs([item], config, "hash", write), written


def clip(tmp_path, name: str, seconds: float, size: tuple[int, int] = (256, 256), fps: float = 25.0, **spec):
    """An embedded-sample style talking clip (a real face photo, real x264 and AAC)."""
    faces = spec.pop("faces", ("astronaut",))
    video, _ = encode_clip(
        ClipSpec(name, faces, fps, 16000, 1, seconds, size, "test", "samples=1", **spec),
        np.random.default_rng(0),
    )
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(video)
    return path


def test_segments_follow_the_streaming_rule_and_keys_name_their_first_frame(tmp_path):
    # 12.5 s with a hard cut at 6 s, then 21 s in one shot: cut points are known only as they pass.
    result, written = ingest(clip(tmp_path, "cut", 12.5, faces=("astronaut", "t1d"), cut_at_s=6.0))
    assert sorted(written) == ["clip-000000", "clip-000150"], result.rejects
    result, written = ingest(clip(tmp_path, "long", 21.0, fps=24.0, faces=("t1c",)))
    expected = split_shot(0, 525, 125, 250)
    assert expected == [(0, 250), (250, 388), (388, 525)]
    assert sorted(written) == [f"clip-{a:06d}" for a, _ in expected]
    for start, end in expected:
        members = written[f"clip-{start:06d}"]
        metadata = json.loads(members["json"])
        assert metadata["num_frames"] == end - start and metadata["start_s"] == start / 25
        assert len(metadata["landmarks"]) == end - start
        affines = np.load(io.BytesIO(members["affine.npy"]))
        assert affines.shape == (end - start, 2, 3)
        assert decode_mp4(members["mp4"]).shape == (end - start, 256, 256, 3)
    assert {"decode", "shots", "faces", "align", "iqa", "encode"} <= set(result.timings_s)


class BufferWatch(StageClock):
    """A stage clock that also notes how many crops and source frames the stream holds."""

    def __init__(self, timings: dict[str, float]):
        super().__init__(timings)
        self.stream: SegmentStream | None = None
        self.most_crops = self.most_pending = 0

    def __call__(self, stage: str):
        if self.stream is not None and hasattr(self.stream, "landmarks"):
            self.most_crops = max(self.most_crops, len(self.stream.landmarks))
            self.most_pending = max(self.most_pending, len(self.stream.pending))
        return super().__call__(stage)


def test_memory_stays_bounded_on_a_long_input(tmp_path):
    # 40 s in one shot. Holding the input would take 1000 crops and frames; the stream holds at
    # most max + min segment frames of crops and a look-ahead of source frames.
    config = resolve_config(DataJobConfig, ["profile=tiny", "align.size=128"])
    path = clip(tmp_path, "long", 40.0, size=(224, 224))
    sample = Sample(source=str(path), dataset="test", key_stem="clip", video_path=str(path))
    sample = run_stages(sample, input_stages(config), {})
    watch = BufferWatch({})
    stream = watch.stream = SegmentStream(Shots(config.ingest), Faces(config.faces), Align(config.align), watch)
    segments = [(s.start_frame, s.end_frame, s.frames.shape) for s in stream(sample)]
    assert segments == [(a, b, (b - a, 128, 128, 3)) for a, b in split_shot(0, 1000, 125, 250)]
    assert 250 <= watch.most_crops <= 250 + 125  # a full segment leaves once the shot has room for another
    assert stream.buffer.shape == (250 + 125, 128, 128, 3)
    lookahead = round(4 * config.faces.smooth_sigma) + config.faces.stride - 1
    assert watch.most_pending <= lookahead + 1


def portrait_clip(tmp_path, source, scale: float, offset: tuple[int, int]) -> str:
    """`source` shrunk by `scale` and pasted at `offset` on a noisy grey 1080x1920 portrait frame,
    encoded with its own audio (libx264 + AAC)."""
    rng = np.random.default_rng(0)
    background = np.clip(rng.normal(120, 12, (1920, 1080, 3)), 0, 255).astype(np.uint8)
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = []
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="rgb24")
            small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            canvas = background.copy()
            canvas[offset[1] : offset[1] + small.shape[0], offset[0] : offset[0] + small.shape[1]] = small
            frames.append(canvas)
    audio = read_audio(str(source), 16000)
    path = tmp_path / "portrait.mp4"
    path.write_bytes(encode_mp4(frames, fps, audio=audio, sample_rate=16000))
    return path


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real clips not present at {REAL_DATA}")
def test_a_face_an_eighth_of_a_portrait_frame_is_found_and_aligned(tmp_path):
    source = REAL_DATA / "vr_face1.mp4"
    big, big_written = ingest(source)
    assert len(big_written) == 1, big.rejects
    (big_members,) = big_written.values()
    big_landmarks = np.array(json.loads(big_members["json"])["landmarks"])
    # dlib's box of this face is ~215 px wide in the 700 px source: shrink it to 1080 / 8 px.
    face_width = np.median(
        [f.box[2] - f.box[0] for f in DlibBackend().detect(decode_mp4_first(source))]
    )
    scale, offset = 1080 / 8 / face_width, (300, 900)
    portrait = portrait_clip(tmp_path, source, scale, offset)

    small, small_written = ingest(portrait)
    assert len(small_written) == 1, small.rejects
    (members,) = small_written.values()
    metadata = json.loads(members["json"])
    assert (metadata["source_width"], metadata["source_height"]) == (1080, 1920)
    landmarks = np.array(metadata["landmarks"])
    # The same face, found where it was pasted: the full-size landmarks mapped into the portrait.
    planted = big_landmarks * scale + np.array(offset)
    eye_distance = np.linalg.norm(planted[:, 1] - planted[:, 0], axis=1).mean()
    error = np.linalg.norm(landmarks - planted, axis=2).mean()
    assert error < 0.1 * eye_distance, f"{error:.1f} px off (eye distance {eye_distance:.0f} px)"
    # The affines put those landmarks on the template, and the crops look like the full-size ones.
    affines = np.load(io.BytesIO(members["affine.npy"]))
    template = template_points("loose", 256)
    on_template = np.stack([apply_affine(a, p) for a, p in zip(affines, landmarks)])
    assert np.linalg.norm(on_template - template, axis=2).mean() < 0.03 * 256
    crops, big_crops = decode_mp4(members["mp4"]), decode_mp4(big_members["mp4"])
    assert crops.shape == big_crops.shape == (len(landmarks), 256, 256, 3)
    correlation = np.corrcoef(crops.astype(float).ravel(), big_crops.astype(float).ravel())[0, 1]
    assert correlation > 0.85, correlation

    # A minimum face size the face is below (what the fixed 512 px detection copy did before).
    missed, written = ingest(portrait, "faces.min_face_size=400")
    assert not written
    assert [(r["stage"], r["reason"]) for r in missed.rejects] == [("faces", "no_face")]


def decode_mp4_first(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_backends_take_a_device_and_load_once_per_process():
    assert face_backend("dlib", "", "cpu") is face_backend("dlib", "", "cpu")
    assert isinstance(face_backend("dlib", "", "cuda"), DlibBackend)  # dlib stays on the CPU
    assert iqa_scorer("sharpness", "", "cuda") is sharpness_score
