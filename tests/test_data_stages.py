"""Unit tests of the data job's stage logic: segmenting, tracking maths, alignment, IQA, weights."""

from __future__ import annotations

import tarfile
import threading

import av
import cv2
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d

from data_jobs import faces as faces_module
from data_jobs.align import ARCFACE, apply_affine, similarity_transform, template_points
from data_jobs.config import DataJobConfig, WriteConfig
from data_jobs.faces import FaceTracker, LandmarkTrack, face_backend
from data_jobs.hyperiqa import HyperIQA, ResNet50, five_crops, load_hyperiqa, load_torchvision_resnet50
from data_jobs.inputs import list_inputs
from data_jobs.iqa import sharpness_score
from data_jobs.media import VideoFrames, cfr_indices, read_audio, rgb_array, timeline_frames, yuv420_frame
from data_jobs.sample import CLIPS, FACE_WIDTH_FRACTION, ClipSpec, encode_clip, portrait, render_frame
from data_jobs.shots import split_shot, split_tail, thumbnail
from data_jobs.writer import ShardWriter
from lipforcing.config import ConfigError
from pipelines.jobs import resolve_config


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (124, []),  # 4.96 s: shorter than one segment
        (125, [(0, 125)]),
        (250, [(0, 250)]),
        (251, [(0, 126), (126, 251)]),  # just over 10 s: two equal halves
        (374, [(0, 187), (187, 374)]),  # one frame short of a full segment plus a minimum one
        (375, [(0, 250), (250, 375)]),  # a full segment is cut as soon as another fits behind it
        (550, [(0, 250), (250, 400), (400, 550)]),  # 22 s: one full, the rest in two halves
    ],
)
def test_split_shot_cuts_full_segments_while_another_fits_then_halves_the_rest(length, expected):
    assert split_shot(0, length, 125, 250) == expected


def test_split_shot_bounds_hold_for_every_length():
    for length in range(125, 2000, 7):
        parts = split_shot(100, 100 + length, 125, 250)
        assert parts[0][0] == 100 and parts[-1][1] == 100 + length
        assert all(125 <= b - a <= 250 for a, b in parts)
        assert all(p[1] == q[0] for p, q in zip(parts, parts[1:]))


def test_split_shot_when_max_is_less_than_twice_min_leaves_the_tail():
    assert split_shot(0, 160, 100, 150) == [(0, 150)]
    assert split_tail(0, 160, 100, 150) == [(0, 150)]
    assert split_shot(0, 300, 100, 150) == [(0, 150), (150, 300)]


def streamed(track: LandmarkTrack, end: int, lookahead: int, known: dict[int, np.ndarray]) -> np.ndarray:
    """What the ingest stream does: add each found face as its frame passes, smooth each frame once
    `lookahead` more frames are known (the rest at the shot's end), forget after each segment."""
    out = []
    for position in range(track.start, end):
        if position in known:
            track.add(position, known[position])
        ready = position - lookahead
        if ready >= track.start:
            out.append(track.smoothed(ready, position + 1))
            if ready % 40 == 39:
                track.forget_before(ready + 1)
    for ready in range(max(track.start, end - lookahead), end):
        out.append(track.smoothed(ready, end))
    return np.stack(out)


@pytest.mark.parametrize("missed", [(), (75, 80, 120)])
def test_landmark_track_streams_the_whole_shot_interpolation_and_smoothing(missed):
    rng = np.random.default_rng(0)
    start, end, stride, sigma = 30, 160, 5, 1.5
    found = np.array([p for p in range(start, end, stride) if p not in missed])
    points = {int(p): rng.normal(100, 5, (5, 2)) for p in found}
    track = LandmarkTrack(start, sigma)
    lookahead = track.radius + stride - 1
    got = streamed(track, end, lookahead, points)
    # Reference, on the whole shot at once: linear between found faces, held at the ends, then
    # scipy's Gaussian with the nearest-edge mode.
    frames = np.arange(start, end)
    values = np.stack([points[int(p)] for p in found]).reshape(len(found), -1)
    raw = np.stack([np.interp(frames, found, column) for column in values.T], axis=1)
    reference = gaussian_filter1d(raw, sigma, axis=0, mode="nearest").reshape(-1, 5, 2)
    # A frame is final before the face after a long miss turns up: its window reaching into such a
    # gap (70-85, 115-125 here) holds the last face instead. Everywhere else: the same numbers.
    gaps = [(a, b) for a, b in zip(found, found[1:]) if b - a > stride]
    exact = np.array([all(f + track.radius <= a for a, b in gaps if f - track.radius < b) for f in frames])
    assert exact.sum() > len(frames) * (0.6 if missed else 0.99)
    np.testing.assert_allclose(got[exact], reference[exact], atol=1e-9)
    if missed:
        assert np.abs(got[~exact] - reference[~exact]).max() > 0.1  # the held frames do differ


def test_smoothing_reduces_jitter_without_moving_the_mean():
    rng = np.random.default_rng(0)
    truth = np.tile(np.array([[100.0, 120.0]] * 5), (200, 1, 1))
    noisy = truth + rng.normal(0, 2.0, truth.shape)
    track = LandmarkTrack(0, sigma=2.0)
    smooth = streamed(track, 200, track.radius, dict(enumerate(noisy)))
    assert np.abs(np.diff(smooth, axis=0)).mean() < 0.3 * np.abs(np.diff(noisy, axis=0)).mean()
    assert np.abs(smooth.mean(0) - truth[0]).max() < 0.5


def test_similarity_transform_recovers_a_known_rotation_scale_and_shift():
    angle, scale, shift = np.deg2rad(12.0), 2.3, np.array([40.0, -15.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = np.array([[30.0, 40.0], [70.0, 41.0], [50.0, 60.0], [35.0, 80.0], [66.0, 79.0]])
    target = source @ (scale * rotation).T + shift
    matrix = similarity_transform(source, target)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)
    np.testing.assert_allclose(apply_affine(matrix, source), target, atol=1e-9)


def test_similarity_transform_is_the_least_squares_fit_without_reflection():
    rng = np.random.default_rng(3)
    source = rng.uniform(0, 100, (5, 2))

    def residual(matrix: np.ndarray) -> float:
        return float(((apply_affine(matrix, source) - target) ** 2).sum())

    for target in (source * 1.7 + rng.normal(0, 4, (5, 2)), source[:, ::-1] + 10.0):  # noisy; mirrored
        matrix = similarity_transform(source, target)
        a, b = matrix[0, 0], matrix[1, 0]
        np.testing.assert_allclose(matrix[:, :2], [[a, -b], [b, a]])  # rotation and uniform scale only
        best = residual(matrix)
        for _ in range(200):  # no nearby similarity fits better
            da, db, dx, dy = rng.normal(0, 1e-3, 4)
            nearby = matrix + np.array([[da, -db, dx], [db, da, dy]])
            assert residual(nearby) >= best - 1e-9


def test_templates_keep_the_face_upright_and_centred():
    for name in ("loose", "arcface"):
        points = template_points(name, 512)
        assert points[0, 0] < 256 < points[1, 0]  # eyes either side of the centre line
        assert points[0, 1] < points[2, 1] < points[3, 1]  # eyes above nose above mouth
        assert abs(points[:, 0].mean() - 256) < 3
    loose, tight = template_points("loose", 512), template_points("arcface", 512)
    assert np.linalg.norm(loose[1] - loose[0]) < np.linalg.norm(tight[1] - tight[0])  # room for the chin
    np.testing.assert_allclose(ARCFACE[0] * 112, [38.2946, 51.6963])


def test_sharpness_calibration_keeps_sharp_sample_frames_and_drops_the_blurred_clip():
    sharp = [s for s in CLIPS if s.faces and not s.blur_sigma and len(s.faces) == 1]
    blurred = next(s for s in CLIPS if s.blur_sigma)
    sharp_scores = [sharpness_score(render_frame(s, 1.0, 0.5, 0.0)) for s in sharp]
    blurred_score = sharpness_score(render_frame(blurred, 1.0, 0.5, 0.0))
    assert min(sharp_scores) >= 40.0, sharp_scores
    assert blurred_score < 40.0


def test_resnet50_has_torchvision_key_layout():
    state = ResNet50().state_dict()
    assert len(state) == 318  # torchvision's resnet50 state dict (320 entries) minus fc.weight/fc.bias
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert state["layer4.2.bn3.running_var"].shape == (2048,)
    torchvision_like = {
        k: torch.randn_like(v.float()) if v.is_floating_point() else v for k, v in state.items()
    }
    torchvision_like["fc.weight"], torchvision_like["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    backbone = ResNet50()
    assert load_torchvision_resnet50(backbone, torchvision_like) == ["fc.bias", "fc.weight"]
    assert torch.equal(backbone.layer2[1].conv1.weight, torchvision_like["layer2.1.conv1.weight"])


def test_hyperiqa_loads_a_checkpoint_in_the_public_koniq_layout(tmp_path):
    state = HyperIQA().state_dict()
    expected_shapes = {
        "res.lda1_pool.0.weight": (16, 256, 1, 1),
        "res.lda1_fc.weight": (16, 1024),
        "res.lda3_fc.weight": (16, 256),
        "res.lda4_fc.weight": (176, 2048),
        "conv1.4.weight": (112, 512, 1, 1),
        "fc1w_conv.weight": (512, 112, 3, 3),
        "fc4w_conv.weight": (8, 112, 3, 3),
        "fc5w_fc.weight": (14, 112),
        "fc5b_fc.weight": (1, 112),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    generator = torch.Generator().manual_seed(0)
    written = {
        k: torch.randn(v.shape, generator=generator) * 0.02 if v.is_floating_point() else v
        for k, v in state.items()
    }
    written.update(
        {k: torch.rand(v.shape, generator=generator) + 0.5 for k, v in state.items() if "running_var" in k}
    )
    path = tmp_path / "koniq_pretrained.pkl"
    torch.save(written, path)
    model = load_hyperiqa(str(path))
    assert torch.equal(model.fc3w_conv.weight, written["fc3w_conv.weight"])
    image = (np.random.default_rng(0).random((300, 300, 3)) * 255).astype(np.uint8)
    with torch.inference_mode():
        scores = model(five_crops(image))
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    torch.save({"model": written}, path)  # some copies wrap the state dict
    assert torch.equal(load_hyperiqa(str(path)).fc1b_fc.bias, written["fc1b_fc.bias"])


def test_hyperiqa_without_weights_is_a_config_error_naming_the_key(tmp_path):
    from data_jobs.job import run_data_job

    config = resolve_config(DataJobConfig, ["iqa.backend=hyperiqa", f"output={tmp_path}"])
    with pytest.raises(ConfigError, match=r"iqa\.weights"):
        run_data_job(config)
    config = resolve_config(DataJobConfig, ["faces.backend=insightface", f"output={tmp_path}"])
    with pytest.raises(ConfigError, match=r"faces\.model_pack"):
        run_data_job(config)


def test_config_rejects_unknown_backends():
    with pytest.raises(ConfigError, match="iqa.backend"):
        resolve_config(DataJobConfig, ["iqa.backend=brisque"])
    assert resolve_config(DataJobConfig, ["profile=tiny"]).align.size == 256
    assert resolve_config(DataJobConfig, ["profile=14b"]).align.size == 512


def test_folder_inputs_pair_same_named_audio_and_tag_datasets(tmp_path):
    (tmp_path / "hdtf").mkdir()
    (tmp_path / "vox" / "id1").mkdir(parents=True)
    for name in ("hdtf/a.mp4", "hdtf/a.wav", "vox/id1/b.MKV", "vox/id1/notes.txt", "top.webm"):
        (tmp_path / name).write_bytes(b"x")
    items = {i.video.rsplit("/", 1)[-1]: i for i in list_inputs(str(tmp_path))}
    assert sorted(items) == ["a.mp4", "b.MKV", "top.webm"]
    assert items["a.mp4"].audio.endswith("hdtf/a.wav") and items["b.MKV"].audio is None
    assert (items["a.mp4"].dataset, items["b.MKV"].dataset, items["top.webm"].dataset) == (
        "hdtf",
        "vox",
        tmp_path.name,
    )
    assert len({i.key_stem for i in items.values()}) == 3 and all(
        "." not in i.key_stem for i in items.values()
    )


def test_list_inputs_resolve_relative_paths_and_keep_keys_stable(tmp_path):
    (tmp_path / "list.csv").write_text("video,audio,dataset\nclips/x.mp4,clips/x.wav,hallo3\n/abs/y.mp4,,\n")
    items = list_inputs(str(tmp_path / "list.csv"))
    assert [i.video for i in items] == ["/abs/y.mp4", f"{tmp_path}/clips/x.mp4"]
    assert items[1].audio == f"{tmp_path}/clips/x.wav" and items[1].dataset == "hallo3"
    assert items[0].dataset == "default" and items[0].audio is None
    assert list_inputs(str(tmp_path / "list.csv")) == items


def test_cfr_indices_pick_the_frame_on_screen_at_each_tick():
    thirty = np.arange(90) / 30.0
    np.testing.assert_array_equal(cfr_indices(thirty, 25.0, 0.0, 6), [0, 1, 2, 3, 4, 6])
    variable = np.array([0.0, 0.0667, 0.1, 0.2, 0.35])  # a VFR stream
    np.testing.assert_array_equal(cfr_indices(variable, 25.0, 0.0, 10), [0, 0, 1, 2, 2, 3, 3, 3, 3, 4])
    np.testing.assert_array_equal(cfr_indices(thirty, 25.0, 2.0, 3), [60, 61, 62])


def test_pyav_fallback_reads_the_same_frames_as_decord(tmp_path):
    spec = ClipSpec("tiny", ("astronaut",), 24, 16000, 2, 1.5, (128, 96), "x", "samples=0")
    video, _ = encode_clip(spec, np.random.default_rng(0))
    path = tmp_path / "clip.mp4"
    path.write_bytes(video)
    with_decord = VideoFrames(str(path), width=64, height=48)
    with_pyav = VideoFrames(str(path), width=64, height=48)
    with_pyav._decord = None  # what happens when decord cannot open a file
    np.testing.assert_allclose(with_decord.timestamps(), with_pyav.timestamps(), atol=1e-3)
    assert len(with_pyav.timestamps()) == 36
    indices = [0, 3, 3, 20, 35]
    decord_frames, pyav_frames = with_decord.read(indices), with_pyav.read(indices)
    assert pyav_frames.shape == decord_frames.shape == (5, 48, 64, 3)
    assert np.abs(decord_frames.astype(int) - pyav_frames.astype(int)).mean() < 4.0
    assert with_pyav.read([1]).shape == (1, 48, 64, 3)  # going backwards reopens the file
    with_pyav.close()
    audio = read_audio(str(path), 16000)
    assert audio.ndim == 1 and abs(len(audio) / 16000 - 1.5) < 0.05


@pytest.mark.parametrize(
    ("max_samples", "max_bytes", "expected"), [(2, 0, [2, 2, 1]), (0, 250, [2, 2, 1]), (0, 0, [5])]
)
def test_shard_writer_rolls_over_by_samples_or_bytes(tmp_path, max_samples, max_bytes, expected):
    config = WriteConfig(shard_max_samples=max_samples, shard_max_bytes=max_bytes)
    writer = ShardWriter(str(tmp_path), "part-000007", config)
    for index in range(5):
        writer.add(f"k{index}", {"json": b"{}", "wav": bytes(100)})
    shards = writer.close()
    assert [s.samples for s in shards] == expected
    assert [s.name for s in shards] == [f"part-000007-{i:02d}" for i in range(len(expected))]
    with tarfile.open(tmp_path / "part-000007-00.tar") as tar:
        assert tar.getnames()[:2] == ["k0.json", "k0.wav"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{s.name}.tar" for s in shards]


def test_timeline_frames_match_random_access_reads_and_stop_cleanly(tmp_path):
    spec = ClipSpec("tiny", ("astronaut",), 30, 16000, 1, 1.5, (128, 96), "x", "samples=0")
    video, _ = encode_clip(spec, np.random.default_rng(0))
    path = tmp_path / "clip.mp4"
    path.write_bytes(video)
    reader = VideoFrames(str(path))
    indices = cfr_indices(reader.timestamps(), 25.0, 0.0, 37)  # 30 fps on 25: every sixth frame skipped
    streamed = np.stack(list(timeline_frames(str(path), indices, ahead=2)))
    assert streamed.shape == (37, 96, 128, 3)
    assert np.abs(streamed.astype(int) - reader.read(indices).astype(int)).mean() < 4.0
    reader.close()
    helpers = threading.active_count()
    frames = timeline_frames(str(path), indices, ahead=2)
    next(frames)
    frames.close()  # the consumer stops early: the decode thread ends with it
    assert threading.active_count() == helpers
    with pytest.raises(FileNotFoundError):  # raised in the decode thread, seen by the consumer
        next(timeline_frames(str(tmp_path / "missing.mp4"), indices))


class SearchLog:
    """The dlib backend, noting the size of every image its detector searched."""

    def __init__(self):
        self.backend, self.searched = face_backend("dlib"), []
        self.refines = True

    def prepare(self, frame):
        return self.backend.prepare(frame)

    def detect(self, image):
        self.searched.append(image.shape[0] * image.shape[1])
        return self.backend.detect(image)

    def refine(self, image, box):
        return self.backend.refine(image, box)


COARSE = faces_module.ACQUIRE_COARSE


def acquire(frame: np.ndarray, coarse: tuple[int, ...], monkeypatch) -> tuple:
    """A fresh tracker's first detection in `frame` with the given coarse passes: (detection, image sizes searched)."""
    monkeypatch.setattr(faces_module, "ACQUIRE_COARSE", coarse)
    log = SearchLog()
    config = resolve_config(DataJobConfig, ["profile=tiny"]).faces
    detection = FaceTracker(config, log, frame.shape[1], frame.shape[0]).detect(0, frame)
    return detection, log.searched


def face_on_canvas(face_width: int) -> np.ndarray:
    """The astronaut's face about `face_width` px wide, pasted on a plain grey 1280x720 frame."""
    side = round(face_width / FACE_WIDTH_FRACTION)
    canvas = np.full((720, 1280, 3), 128, np.uint8)
    top, left = (720 - side) // 2, (1280 - side) // 2
    canvas[top : top + side, left : left + side] = portrait("astronaut", side, side).image
    return canvas


# At the tiny profile's fine scale (80 / 64 px) the coarse passes see faces from 128 and 256 px,
# but a pass counts only if it would also see a face of half the area: from 181 and 362 px.
@pytest.mark.parametrize("face_width, coarse_enough", [(240, True), (150, False), (72, False)])
def test_coarse_to_fine_acquisition_finds_what_the_fine_search_finds(face_width, coarse_enough, monkeypatch):
    frame = face_on_canvas(face_width)
    fine, fine_sizes = acquire(frame, (), monkeypatch)
    found, sizes = acquire(frame, COARSE, monkeypatch)
    assert fine.face is not None and found.face is not None
    assert found.checked and not found.multiple
    width = fine.face.box[2] - fine.face.box[0]
    assert width == pytest.approx(face_width, rel=0.35)  # the planted face, not something else
    # The same face: boxes agree to a fifth of its width (each scale's HOG grid places it a little differently).
    assert np.abs(found.face.box - fine.face.box).max() < 0.2 * width
    assert np.abs(found.face.landmarks - fine.face.landmarks).max() < 0.1 * width
    if coarse_enough:  # the fine (largest) image is never searched
        assert max(sizes) < fine_sizes[0]
    else:  # both coarse passes run, then the fine search decides
        assert sizes[-1] == fine_sizes[0] and len(sizes) == 1 + len(COARSE)


def test_coarse_acquisition_still_sees_a_comparable_second_face(monkeypatch):
    spec = ClipSpec("two", ("astronaut", "t1d"), 25, 16000, 1, 1.0, (960, 480), "x", "x")
    frame = render_frame(spec, 0.0, 0.0, 0.0)
    fine, _ = acquire(frame, (), monkeypatch)
    found, _ = acquire(frame, COARSE, monkeypatch)
    assert fine.multiple and found.multiple


def test_thumbnail_of_a_large_frame_matches_area_averaging():
    rng = np.random.default_rng(0)
    # Smooth content with detail at several scales, as a video frame has.
    noise = cv2.GaussianBlur(rng.normal(128, 60, (720, 1280, 3)).astype(np.float32), (0, 0), 3)
    frame = np.clip(noise + np.linspace(0, 60, 1280)[None, :, None], 0, 255).astype(np.uint8)
    small = thumbnail(frame, (96, 54))
    assert small.shape == (54, 96, 3)
    area = cv2.resize(frame, (96, 54), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - area).mean() < 2.0
    assert np.array_equal(thumbnail(area, (96, 54)), area)  # already small: area averaging only


def test_yuv_fast_paths_use_ffmpegs_bt601_limited_range_conversion():
    """OpenCV converts the common case; the colours must be what FFmpeg itself would give."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), (0, 0), 2)
    image[:16, :16] = (255, 0, 0)  # saturated patches: a wrong matrix or range shows most here
    image[:16, 16:32] = (0, 255, 0)
    image[:16, 32:48] = (0, 0, 255)
    by_ffmpeg = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
    ours = yuv420_frame(image)
    for plane, (a, b) in enumerate(zip(ours.planes, by_ffmpeg.planes)):
        ours_plane, ffmpeg_plane = (np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in (a, b))
        # The matrix and range agree inside flat patches; chroma subsampling filters differ only at edges.
        patch = (slice(2, 6), slice(2, 6)) if plane else (slice(4, 12), slice(4, 12))
        for column in range(3):
            shifted = (patch[0], slice(patch[1].start + column * (16 >> bool(plane)), patch[1].stop + column * (16 >> bool(plane))))
            assert np.abs(ours_plane[shifted].astype(int) - ffmpeg_plane[shifted]).max() <= 1
        assert np.abs(ours_plane.astype(int) - ffmpeg_plane).mean() < 1.5
    decoded = rgb_array(by_ffmpeg)
    assert np.abs(decoded[4:12, 4:44].astype(int) - by_ffmpeg.to_ndarray(format="rgb24")[4:12, 4:44]).max() <= 2
    assert np.abs(decoded.astype(int) - by_ffmpeg.to_ndarray(format="rgb24")).mean() < 1.5
    tagged = by_ffmpeg.reformat(format="yuv420p")
    tagged.colorspace = 1  # BT.709: OpenCV's matrix would be wrong, FFmpeg honours the tag
    assert np.array_equal(rgb_array(tagged), tagged.to_ndarray(format="rgb24"))
    odd = image[:63, :95]
    assert yuv420_frame(odd).format.name == "rgb24"  # odd sizes are left to FFmpeg
