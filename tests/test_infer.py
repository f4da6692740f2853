"""`make infer`: a real talking-head clip lip-synced to another clip's speech with a tiny random-init
student (plumbing, never a quality result): the output follows the audio, carries it, and differs from
the source only inside the pasted mouth box; a video with no face passes through untouched."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from safetensors.torch import save_file

from data_jobs.config import AlignConfig, FacesConfig
from data_jobs.media import encode_mp4, encode_wav, probe_media, read_audio, timeline_frames
from data_jobs.sample import ClipSpec, encode_clip
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.inference.paste import blend_mask, crop_affine
from lipforcing.models import build_student
from lipforcing.models.config import model_config
from pipelines.infer import (
    InferConfig,
    Lipsynced,
    TimelineReader,
    edit_runs,
    lipsync,
    output_sources,
    read_timeline,
    synthesize,
    track,
    write_video,
)
from pipelines.jobs import resolve_config

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def source_frames(video: str) -> list[np.ndarray]:
    return list(timeline_frames(video, read_timeline(video).indices))


def test_a_short_video_plays_forward_then_backward_and_a_long_one_is_cut():
    assert output_sources(4, 9).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert output_sources(1, 3).tolist() == [0, 0, 0]
    assert output_sources(10, 5).tolist() == [0, 1, 2, 3, 4]


def test_the_reader_gives_the_timeline_frame_asked_for_forward_backward_and_far_back(tmp_path):
    """The second pass holds a second of frames: playing backwards seeks to the keyframe before the
    frames it needs (a keyframe every 10 frames here, B-frames on) and must still land on each one."""
    import av

    video = str(tmp_path / "ramp.mp4")
    with av.open(video, "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.options = {"crf": "0", "g": "10", "bf": "2"}
        for i in range(60):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 48, 3), 4 * i, np.uint8), format="rgb24")))
        container.mux(stream.encode())
    reader = TimelineReader(video, read_timeline(video), held=25)
    try:
        for position in [*range(60), *range(58, -1, -1), 40, 3, 37]:
            assert abs(int(reader[position].mean()) - 4 * position) <= 2, position
            assert len(reader.held) <= 25
    finally:
        reader.close()


def test_the_student_edits_runs_of_one_shot_with_a_face():
    """Each run is streamed with its own reference and cache: a cut, a lost face or a turn into
    another shot starts a new one; runs shorter than the first chunk pass through."""
    timeline = 60
    faced = np.ones(timeline, bool)
    faced[20:24] = False  # the face lost for 4 frames
    faced[44:50] = False  # and for 6, leaving a run of 4 frames (40..43) too short for a first chunk
    result = Lipsynced(iter(()), np.zeros(0, np.float32), np.arange(timeline), np.zeros((timeline, 2, 3)), faced, cuts=[40])
    assert edit_runs(result, 9) == [range(0, 20), range(24, 40), range(50, 60)]
    result.faced[:] = True
    result.sources = output_sources(timeline, 100)  # forward to 59, then back: 58 .. 40 | 39 .. 0 | 1
    # source 40..59 and back to 40 is one shot (output 40..78); then 39 .. 0 and 1 (output 79..99)
    assert edit_runs(result, 9) == [range(0, 40), range(40, 79), range(79, 100)]


@pytest.fixture
def student(tmp_path) -> str:
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in build_student(model_config("tiny")).state_dict().items()}, str(path))
    return str(path)


@pytest.mark.integration
@pytest.mark.skipif(not (REAL / "vr_face1.mp4").exists(), reason=f"the real clips are not at {REAL}")
def test_a_real_clip_with_foreign_audio(student, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    video, speech = str(REAL / "vr_face1.mp4"), str(REAL / "vr_audio2.wav")  # another recording's speech
    config = resolve_config(InferConfig, ["profile=tiny", f"video={video}", f"audio={speech}", f"student_weights={student}", f"output={tmp_path}/out.mp4"])
    result = synthesize(config)
    frames = list(result.frames)
    expected = (len(read_audio(speech, SAMPLE_RATE)) // (SAMPLE_RATE // FPS) - 1) // 4 * 4 + 1  # the audio's 4k+1 frames
    assert len(frames) == expected and len(result.audio) == expected * SAMPLE_RATE // FPS
    source = source_frames(video)
    assert result.faced.mean() > 0.9  # one visible face throughout
    mask = blend_mask(config.window.size, config.window.mask_box, config.feather)
    changed_anywhere = False
    for out, s in zip(frames, result.sources):
        height, width = out.shape[:2]
        weight = cv2.warpAffine(mask, crop_affine(result.affines[s], 512, config.window.size), (width, height),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)  # fmt: skip
        assert np.array_equal(out[weight == 0], source[s][weight == 0])  # outside the mouth box: the source, bit for bit
        changed_anywhere |= bool(np.any(out[weight > 0.5] != source[s][weight > 0.5]))
    assert changed_anywhere

    write_video(config.output, frames, result.audio)
    info = probe_media(config.output)
    assert info.has_audio and info.audio_rate == SAMPLE_RATE and info.fps == FPS
    assert abs(info.duration_s - len(frames) / FPS) < 0.05
    assert (info.width, info.height) == (source[0].shape[1], source[0].shape[0])


@pytest.mark.integration
def test_a_video_without_a_face_passes_through(student, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    video, _ = encode_clip(ClipSpec("empty", (), 25, 16000, 1, 3.0, (160, 128), "x", "x"), np.random.default_rng(0))
    (tmp_path / "empty.mp4").write_bytes(video)
    config = resolve_config(InferConfig, ["profile=tiny", f"video={tmp_path}/empty.mp4", f"student_weights={student}"])
    result = synthesize(config)
    source = source_frames(config.video)
    assert not result.faced.any()
    assert all(np.array_equal(out, source[s]) for out, s in zip(result.frames, result.sources))


@pytest.mark.integration
def test_with_a_face_parser_the_edit_still_stays_inside_the_box(student, tmp_path, monkeypatch):
    """`parsing_weights` (here a random BiSeNet saved under the released key names: its classes are
    arbitrary, so only the plumbing is checked; the mask itself is pinned in test_face_parsing.py)."""
    import torch

    from lipforcing.models.face_parsing import BiSeNet

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    torch.manual_seed(0)
    torch.save(BiSeNet().state_dict(), tmp_path / "parser.pth")
    video, _ = encode_clip(ClipSpec("talk", ("astronaut",), 25, 16000, 1, 2.0, (320, 320), "x", "x"), np.random.default_rng(4))
    (tmp_path / "talk.mp4").write_bytes(video)
    config = resolve_config(InferConfig, ["profile=tiny", f"video={tmp_path}/talk.mp4", f"student_weights={student}",
                                          f"parsing_weights={tmp_path}/parser.pth"])  # fmt: skip
    result = synthesize(config)
    assert result.faced.any()
    source = source_frames(config.video)
    box = blend_mask(config.window.size, config.window.mask_box, config.feather)
    for out, s in zip(result.frames, result.sources):
        weight = cv2.warpAffine(box, crop_affine(result.affines[s], 512, config.window.size), (320, 320),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)  # fmt: skip
        assert np.array_equal(out[weight == 0], source[s][weight == 0])


@pytest.mark.integration
def test_an_odd_frame_size_is_padded_to_even_and_written(student, tmp_path, monkeypatch):
    """H.264 in yuv420p needs even sizes: a 161x121 video comes out 162x122 instead of failing at the end."""
    import av

    from data_jobs.media import encode_wav

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    path = tmp_path / "odd.mkv"  # lossless FFV1: the odd size survives, as from a camera
    rng = np.random.default_rng(5)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 161, 121, "yuv444p"
        for _ in range(50):
            image = rng.integers(0, 256, (121, 161, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    speech = np.sin(np.linspace(0, 2000, int(1.8 * SAMPLE_RATE))).astype(np.float32) * 0.3
    (tmp_path / "speech.wav").write_bytes(encode_wav(speech, SAMPLE_RATE))
    config = resolve_config(InferConfig, ["profile=tiny", f"video={path}", f"audio={tmp_path}/speech.wav",
                                          f"student_weights={student}", f"output={tmp_path}/out.mp4"])  # fmt: skip
    lipsync(config)
    info = probe_media(config.output)
    assert (info.width, info.height) == (162, 122) and info.has_audio


@pytest.mark.integration
@pytest.mark.skipif(not (REAL / "vr_face3.mp4").exists(), reason=f"the real clips are not at {REAL}")
def test_a_cut_between_two_people_restarts_the_face_track(student, tmp_path, monkeypatch):
    """Two real clips joined at frame 40: the cut is found there and the second shot's warps are those of
    the second clip tracked on its own; one track smoothed across the cut would pull them towards the
    first face."""
    first, second = (source_frames(str(REAL / name))[:40] for name in ("vr_face3.mp4", "vr_face5.mp4"))
    second = [cv2.resize(frame, first[0].shape[1::-1], interpolation=cv2.INTER_AREA) for frame in second]
    (tmp_path / "joined.mp4").write_bytes(encode_mp4(first + second, FPS, crf=0))
    (tmp_path / "second.mp4").write_bytes(encode_mp4(second, FPS, crf=0))
    joined, second_alone, across = (
        track(str(tmp_path / name), read_timeline(str(tmp_path / name)).indices, FacesConfig(), AlignConfig(), threshold)
        for name, threshold in (("joined.mp4", 27.0), ("second.mp4", 27.0), ("joined.mp4", 255.0))
    )
    assert joined.cuts == [40] and second_alone.cuts == [] and across.cuts == []
    assert joined.faced.all()
    own = np.abs(joined.affines[40:] - second_alone.affines).max(axis=(1, 2))
    smoothed_across = np.abs(across.affines[40:] - second_alone.affines).max(axis=(1, 2))
    assert own.max() < 0.5  # the same detections on (losslessly) the same frames
    assert smoothed_across[0] > 10 * max(own[0], 0.05)

    # Generation: two runs (40 frames, not 1 + 4k, then the rest), each edited to its last frame.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    speech = np.sin(np.linspace(0, 3000, 80 * 640)).astype(np.float32) * 0.3
    (tmp_path / "speech.wav").write_bytes(encode_wav(speech, SAMPLE_RATE))
    config = resolve_config(InferConfig, ["profile=tiny", f"video={tmp_path / 'joined.mp4'}", f"audio={tmp_path / 'speech.wav'}",
                                          f"student_weights={student}"])  # fmt: skip
    result = synthesize(config)
    assert edit_runs(result, 9) == [range(0, 40), range(40, 77)]
    frames = list(result.frames)
    source = source_frames(str(tmp_path / "joined.mp4"))
    assert all(np.any(out != source[s]) for out, s in zip(frames, result.sources))  # every frame edited
