"""`make eval` end to end on a tiny student: real shards, real codecs, a real MLflow store.

The student is a random-init tiny DiT exported like the distill job exports it and registered as
`lipforcing-student@candidate`; the shards are synthetic clips in the data job's format.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import av
import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data_jobs.media import encode_mp4, encode_wav, to_uint8
from data_jobs.sample import ClipSpec, encode_clip
from lipforcing.config import ConfigError
from lipforcing.data.shards import Reader, decode_clip, epoch_samples, shard_urls
from lipforcing.data.windows import resize_frames
from lipforcing.metrics.fid import i3d_extractor, load_torchscript
from lipforcing.models import build_student
from lipforcing.models.config import model_config
from lipforcing.models.syncnet import StableSyncNet, SyncNetConfig, load_syncnet, save_syncnet, score_clip
from pipelines import tracking
from pipelines.evaluate import (
    TINY_WARNING,
    EvalClip,
    EvalConfig,
    FeatureSets,
    evaluate,
    prepare_clip,
    validate,
)
from pipelines.evaluate.long_form import infer_settings, segment_bounds
from pipelines.jobs import resolve_config, run_job
from pipelines.student_model import log_student
from tests.insightface_pack import write_pack

FPS, RATE, SIZE = 25, 16_000, 64
# (key, frames): 41 frames -> all 41 evaluated (3 full chunks + a 2-latent one); 36 -> the 33-frame
# prefix; 5 frames are shorter than the first chunk and must be reported as skipped
CLIPS = (("talk-a", 41), ("talk-b", 36), ("too-short", 5))
PER_CLIP_METRICS = (
    "ssim",
    "psnr",
    "mouth_psnr",
    "mouth_l1",
    "csim",
    "sync_c",
    "sync_d",
    "gt_sync_c",
    "gt_sync_d",
    "fps",
    "ttff_ms",
)


def synthetic_clip(frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey 'face' whose dark mouth box opens and closes with the loudness of a tone."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / FPS
    opening = 0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * t + seed)
    video = np.full((frames, SIZE, SIZE, 3), 150, np.uint8)
    video[:, 8:30, 16:48] = 190  # forehead and eyes region, brighter
    for i, amount in enumerate(opening):
        height = 2 + int(8 * amount)
        video[i, 44 : 44 + height, 22:42] = 40
    video = (video + rng.integers(0, 8, video.shape)).astype(np.uint8)
    samples = np.arange(frames * RATE // FPS) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * samples + seed)
    audio = (0.3 * envelope * np.sin(2 * np.pi * 220 * samples)).astype(np.float32)
    return video, audio


def write_shards(folder: Path) -> None:
    """The data job's format: <key>.mp4 (H.264), .wav (16 kHz), .json, .affine.npy in one tar. Each
    clip's source video is its crops themselves (so the warp is the identity), beside the shards."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "test-000000.tar", "w") as tar:
        for seed, (key, frames) in enumerate(CLIPS):
            video, audio = synthetic_clip(frames, seed)
            source = folder.parent / "sources" / f"{key}.mp4"
            source.parent.mkdir(exist_ok=True)
            source.write_bytes(encode_mp4(video, FPS, crf=0))
            affine = io.BytesIO()
            np.save(affine, np.tile(np.eye(2, 3, dtype=np.float32), (frames, 1, 1)))
            metadata = {"dataset": "test", "key": key, "num_frames": frames, "source": str(source), "start_s": 0.0}
            members = {
                "mp4": encode_mp4(video, FPS),
                "wav": encode_wav(audio, RATE),
                "json": json.dumps(metadata).encode(),
                "affine.npy": affine.getvalue(),
            }
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Shards, a registered tiny student, a SyncNet checkpoint and a stub InsightFace pack (CSIM),
    with MLflow's store under tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_shards(tmp_path / "data" / "shards")
    student = build_student(model_config("tiny"))
    weights = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(weights))
    with tracking.start_run("distill-stub", tags={"job": "test"}) as run:
        mlflow.log_artifact(str(weights))
    version = log_student(run.info.run_id, "dit.safetensors", resolve_config(EvalConfig, ["profile=tiny"]), "lipforcing-student", {}, "candidate")
    save_syncnet(StableSyncNet(SyncNetConfig()), str(tmp_path / "syncnet.pt"))
    write_pack(tmp_path / "buffalo_l")  # its stub ArcFace model gives CSIM
    return tmp_path, version


def test_eval_end_to_end_on_a_tiny_student(workspace):
    root, version = workspace
    argv = [
        "profile=tiny",
        f"data={root / 'data'}",
        f"output={root / 'eval'}",
        "student_weights=models:/lipforcing-student@candidate",
        f"syncnet_weights={root / 'syncnet.pt'}",
        f"csim_model_pack={root / 'buffalo_l'}",
        f"fvd_weights={root / 'i3d.pt'}",
        "clips=8",
        "samples=1",
    ]
    torch.jit.script(MeanFeatures()).save(str(root / "i3d.pt"))  # a stand-in I3D: per-channel means
    assert run_job("pipelines.evaluate", EvalConfig, evaluate, argv=argv) == 0

    report = json.loads((root / "eval" / "report.json").read_text())
    frames = {row["key"]: row["frames"] for row in report["clips"]}
    assert frames == {"talk-a": 41, "talk-b": 33}
    assert [c["key"] for c in report["skipped_clips"]] == ["too-short"]
    syncnet = load_syncnet(SyncNetConfig(weights=str(root / "syncnet.pt")))
    sources = {s["__key__"]: decode_clip(s) for s in epoch_samples(shard_urls(str(root / "data")), Reader(), 0, 0)}
    for row in report["clips"]:
        for name in PER_CLIP_METRICS:
            assert math.isfinite(row[name]), (row["key"], name, row[name])
        assert row["ssim"] < 0.5  # a random student does not reproduce the source crops
        assert row["full_ssim"] > row["ssim"] + 0.2  # pasted back, only the mouth box differs from the source
        assert math.isfinite(row["full_csim"])
        assert row["ttff_ms"] > 0 and row["fps"] > 0 and row["peak_memory_mb"] > 0
        # the GT columns score the source crops it evaluated, with their own audio
        clip = prepare_clip(sources[row["key"]], SIZE, 9)
        truth = score_clip(syncnet, to_uint8(clip.video), clip.audio.numpy())
        assert (row["gt_sync_c"], row["gt_av_offset"]) == (pytest.approx(truth.confidence, abs=1e-5), truth.offset)
    assert report["mean"]["ssim"] == pytest.approx(np.mean([r["ssim"] for r in report["clips"]]))
    assert set(report["skipped_metrics"]) == {"FID"}
    assert report["set_metrics"]["full_fvd"] < report["set_metrics"]["fvd"]  # pasted back, most of each frame is the source
    assert report["student_version"] == str(version)
    assert report["reference"] == "the first frame of each clip"

    markdown = (root / "eval" / "report.md").read_text()
    assert TINY_WARNING in markdown
    assert "| **mean** |" in markdown and "| CSIM |" in markdown and "FID skipped" in markdown and "full-frame FVD" in markdown

    samples = sorted((root / "eval" / "samples").glob("*.mp4"))
    assert len(samples) == 1
    with av.open(str(samples[0])) as container:
        assert container.streams.audio, "a lip-sync sample needs its audio"
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert first.shape == (SIZE, 2 * SIZE, 3)  # source | generated

    runs = mlflow.search_runs(
        experiment_names=[tracking.EXPERIMENT], filter_string="tags.job = 'eval'", output_format="list"
    )
    assert len(runs) == 1
    logged = runs[0].data
    for name in ("ssim", "csim", "sync_c", "sync_d", "gt_sync_c", "fps", "ttff_ms", "peak_memory_mb"):
        assert logged.metrics[name] == pytest.approx(report["mean"][name])
    assert logged.tags["student_version"] == str(version)
    assert logged.params["decoder"] == "tae"
    artifacts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=runs[0].info.run_id)}
    assert {"report.json", "report.md", "samples", "config.yaml"} <= artifacts


def test_cross_identity_drives_each_clip_with_the_next_clips_audio(workspace):
    root, _ = workspace
    argv = ["profile=tiny", f"data={root / 'data'}", f"output={root / 'cross'}", "student_weights=models:/lipforcing-student@candidate",
            f"syncnet_weights={root / 'syncnet.pt'}", "audio_from=other", "full_frame=false", "samples=0"]  # fmt: skip
    assert run_job("pipelines.evaluate", EvalConfig, evaluate, argv=argv) == 0
    report = json.loads((root / "cross" / "report.json").read_text())
    assert {row["key"]: row["frames"] for row in report["clips"]} == {"talk-a.audio-talk-b": 33, "talk-b.audio-talk-a": 33}
    assert report["audio"] == "the next clip's (cross-identity)"
    syncnet = load_syncnet(SyncNetConfig(weights=str(root / "syncnet.pt")))
    sources = {s["__key__"]: decode_clip(s) for s in epoch_samples(shard_urls(str(root / "data")), Reader(), 0, 0)}
    for row in report["clips"]:  # the GT columns: this clip's source crops against the other clip's audio
        face, voice = row["key"].split(".audio-")
        truth = score_clip(syncnet, to_uint8(prepare_clip(sources[face], SIZE, 9, 33).video), sources[voice].audio[: 33 * RATE // FPS])
        assert row["gt_sync_c"] == pytest.approx(truth.confidence, abs=1e-5)


def test_cross_identity_pairs_each_clip_with_another_person():
    from pipelines.evaluate.clips import EvalClip, with_other_audio

    def clip(key: str, identity: str, frames: int = 33) -> EvalClip:
        return EvalClip(key, torch.zeros(frames, 3, 8, 8), torch.full((frames * RATE // FPS,), float(len(key))), identity=identity)

    paired = with_other_audio([clip("a1", "ann"), clip("a2", "ann"), clip("bo", "bob", 25)])
    assert [c.key for c in paired] == ["a1.audio-bo", "a2.audio-bo", "bo.audio-a1"]  # never the same person
    assert [len(c.video) for c in paired] == [25, 25, 25]
    with pytest.raises(ConfigError, match="all show 'ann'"):
        with_other_audio([clip("a1", "ann"), clip("a2", "ann")])


def test_full_frame_metrics_paste_back_where_the_data_job_cut(tmp_path):
    """A source with other frames before the clip (start_s > 0), the face crop placed off-centre at the
    aligned size (96 px) while the model works at 64 px: pasting the clip's own crops back nearly
    reproduces the source frames; a wrong start or a wrong warp does not."""
    import cv2

    from pipelines.evaluate.clips import EvalClip, Placement
    from pipelines.evaluate.runner import full_frame_metrics, full_frames

    before, frames, offset = 6, 33, (20, 8)
    video, audio = synthetic_clip(frames, 0)
    aligned = np.stack([cv2.resize(frame, (96, 96), interpolation=cv2.INTER_LINEAR) for frame in video])
    rng = np.random.default_rng(1)
    canvas = rng.integers(0, 256, (before + frames, 112, 128, 3), dtype=np.uint8)
    canvas[before:, offset[1] : offset[1] + 96, offset[0] : offset[0] + 96] = aligned
    (tmp_path / "source.mp4").write_bytes(encode_mp4(canvas, FPS, crf=0))
    affines = np.tile(np.array([[1, 0, -offset[0]], [0, 1, -offset[1]]], np.float32), (frames, 1, 1))
    crops = resize_frames(aligned, SIZE)
    box = [0.55, 0.95, 0.2, 0.8]

    def measured(start_s: float, shift: float = 0.0) -> dict[str, float]:
        placement = Placement(str(tmp_path / "source.mp4"), start_s, affines + np.array([[0, 0, shift], [0, 0, 0]], np.float32), 96)
        pasted = full_frames(EvalClip("c", crops, torch.from_numpy(audio), placement), crops, box)
        face_error = np.abs(pasted.fake_faces.astype(float) - pasted.real_faces).mean()  # what full-frame CSIM compares
        return {**full_frame_metrics(pasted), "face_error": face_error}

    right = measured(before / FPS)
    assert right["full_psnr"] > 33 and right["full_ssim"] > 0.97 and right["face_error"] < 3
    assert measured((before - 4) / FPS)["full_psnr"] < right["full_psnr"] - 5  # the wrong frames
    wrong_place = measured(before / FPS, shift=6.0)
    assert wrong_place["full_psnr"] < right["full_psnr"] - 5 and wrong_place["face_error"] > 3 * right["face_error"]


def test_long_form_segments_partition_the_output_and_a_short_tail_joins_the_last():
    assert segment_bounds(121, 50) == [(0, 50), (50, 121)]  # 21 frames left: under half a segment
    assert segment_bounds(130, 50) == [(0, 50), (50, 100), (100, 130)]
    assert segment_bounds(30, 50) == [(0, 30)]


def test_long_form_finds_faces_with_the_evals_face_keys():
    """A long-form video is tracked by `make infer`'s code: the eval's face keys (and the profile's) must reach it."""
    config = resolve_config(EvalConfig, ["shot_threshold=40", "faces.stride=3", "align.size=256", "decoder=vae", "seed=7"])
    settings = infer_settings(config, "talk.mp4")
    assert (settings.shot_threshold, settings.faces.stride, settings.align.size) == (40.0, 3, 256)
    assert (settings.video, settings.decoder, settings.seed, settings.model) == ("talk.mp4", "vae", 7, config.model)


def test_long_form_scores_each_segment_as_a_whole_and_reports_the_drift(workspace):
    """A 5 s talking head streamed whole, scored every 2 s: each segment's numbers must be those of the
    segment's frames scored at once (the same seeded stream, generated again here), and the drift the
    last segment's minus the first's, in the report and in MLflow."""
    from pipelines.evaluate import Evaluator
    from pipelines.infer import InferConfig, TimelineReader, generated_chunks, prepare

    root, _ = workspace
    video, _ = encode_clip(ClipSpec("long", ("astronaut",), 25, 16000, 1, 5.0, (256, 256), "x", "x"), np.random.default_rng(7))
    (root / "long.mp4").write_bytes(video)
    argv = ["profile=tiny", f"data={root / 'data'}", f"output={root / 'long'}", "student_weights=models:/lipforcing-student@candidate",
            f"syncnet_weights={root / 'syncnet.pt'}", "clips=1", "full_frame=false", "samples=0",
            f"long_form=[{root / 'long.mp4'}]", "long_form_segment_s=2"]  # fmt: skip
    assert run_job("pipelines.evaluate", EvalConfig, evaluate, argv=argv) == 0
    report = json.loads((root / "long" / "report.json").read_text())
    segments = report["long_form"]["segments"]
    assert [(row["start_s"], row["end_s"]) for row in segments] == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)]  # 125 frames

    config = resolve_config(EvalConfig, [*argv, f"student_weights={root / 'dit.safetensors'}"])
    evaluator = Evaluator(config, str(root / "dit.safetensors"), str(root / "syncnet.pt"), torch.device("cpu"))
    settings = InferConfig(video=str(root / "long.mp4"), window=config.window, model=config.model)
    prepared = prepare(settings, evaluator)
    with prepared.stack:
        chunks = list(generated_chunks(settings, prepared, TimelineReader(prepared.video, prepared.timeline)))
    source, generated = torch.cat([c.source for c in chunks]), torch.cat([c.generated for c in chunks])
    for row, (start, stop) in zip(segments, [(0, 50), (50, 100), (100, 125)], strict=True):
        expected = evaluator.fidelity(EvalClip("x", source[start:stop], torch.empty(0)), generated[start:stop])
        expected.update(evaluator.sync(to_uint8(generated[start:stop]), prepared.result.audio[start * 640 : stop * 640]))
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    drift = report["long_form"]["drift"][0]
    assert drift["sync_c_drift"] == pytest.approx(segments[2]["sync_c"] - segments[0]["sync_c"])
    assert "Long-form" in (root / "long" / "report.md").read_text()
    run = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string="tags.job = 'eval'", output_format="list")[0]
    assert run.data.metrics["long_form_ssim_drift"] == pytest.approx(drift["ssim_drift"])
    with pytest.raises(ConfigError, match="'long_form_segment_s'"):
        validate(EvalConfig(long_form_segment_s=0.5))


def test_a_registered_student_samples_at_the_timesteps_it_was_trained_for(workspace):
    """A recipe from `make analyze` moves the student's second timestep: eval and infer of a
    registered version must use the version's own, not the profile's."""
    from pipelines.student_model import sampling_timesteps

    root, _ = workspace
    with tracking.start_run("distill-recipe", tags={"job": "test"}) as run:
        mlflow.log_artifact(str(root / "dit.safetensors"))
    settings = resolve_config(EvalConfig, ["profile=tiny", "model.student_timesteps=[0.999,0.833]"])
    log_student(run.info.run_id, "dit.safetensors", settings, "recipe-student", {}, "candidate")
    profile = [0.999, 0.769]
    assert sampling_timesteps("models:/recipe-student@candidate", profile) == [0.999, 0.833]
    assert sampling_timesteps("models:/lipforcing-student@candidate", profile) == profile  # trained at the profile's
    assert sampling_timesteps(str(root / "dit.safetensors"), profile) == profile  # a path: as configured
    client = mlflow.tracking.MlflowClient()
    client.delete_model_version_tag("recipe-student", "1", "student_timesteps")  # registered before the tag
    assert sampling_timesteps("models:/recipe-student@candidate", profile) == profile


def test_eval_config_errors_name_the_key(capsys):
    assert run_job("pipelines.evaluate", EvalConfig, evaluate, argv=["decoder=jpeg"]) == 2
    error = capsys.readouterr().err
    assert "'decoder'" in error and "'tae', 'vae'" in error
    with pytest.raises(ConfigError, match="'clips'"):
        validate(EvalConfig(clips=0))


def test_a_65_channel_student_streams_with_the_source_as_its_reference_sequence():
    """Released students read 65 channels; eval gives them the unmasked source frames as reference
    sequence (as the released inference does) and streams them like a 49-channel student."""
    from pipelines.evaluate import EvalClip, Evaluator

    config = EvalConfig(model=model_config("tiny", use_reference_sequence=True), syncnet_weights="")
    config.window.size = SIZE
    validate(config)
    evaluator = Evaluator(config, student_path="", syncnet_path="", device=torch.device("cpu"))
    assert evaluator.student.patch_embedding.in_channels == 65
    video, audio = synthetic_clip(13, seed=0)
    clip = EvalClip("c", torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(audio))
    generation = evaluator.generate(clip)
    assert generation.frames.shape == (13, 3, SIZE, SIZE) and generation.chunks == 2


def test_fidelity_metrics_on_planted_frames():
    """Generated == source: SSIM 1 and no mouth error; the mouth box blacked out: the mouth L1 is the
    source's mean there, and nothing outside the box counts."""
    from pipelines.evaluate import EvalClip, Evaluator

    config = EvalConfig(syncnet_weights="")
    config.window.size = SIZE
    evaluator = Evaluator(config, student_path="", syncnet_path="", device=torch.device("cpu"))
    video, audio = synthetic_clip(9, seed=3)
    source = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    clip = EvalClip("planted", source, torch.from_numpy(audio))
    same = evaluator.fidelity(clip, source)
    assert same["ssim"] == pytest.approx(1.0) and same["mouth_l1"] == 0.0
    mouth = evaluator.mouth.bool()
    blacked = source.clone()
    blacked[..., mouth] = 0
    planted = evaluator.fidelity(clip, blacked)
    assert planted["mouth_l1"] == pytest.approx(float(source[..., mouth].mean()), rel=1e-5)
    assert planted["ssim"] < 0.99


class MeanFeatures(torch.nn.Module):
    """Follows the I3D TorchScript file's calling convention; features = per-channel means."""

    def forward(
        self, videos: torch.Tensor, rescale: bool, resize: bool, return_features: bool
    ) -> torch.Tensor:
        return videos.mean(dim=(2, 3, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_frechet_metrics_accumulate_over_clips(tmp_path):
    """The FID / FVD plumbing with stand-in networks (the job only runs it with real weights)."""
    path = str(tmp_path / "i3d.pt")
    torch.jit.script(MeanFeatures()).save(path)
    fvd = i3d_extractor(load_torchscript(path, "fvd_weights"))
    source = [torch.rand(9, 3, 16, 16) for _ in range(3)]
    same, shifted = (
        FeatureSets({"fvd": fvd}, torch.device("cpu")),
        FeatureSets({"fvd": fvd}, torch.device("cpu")),
    )
    for clip in source:
        same.add(clip, clip)
        shifted.add(clip, (clip + 0.3).clamp(0, 1))
    assert same.distances()[0]["fvd"] == pytest.approx(0.0, abs=1e-4)
    assert shifted.distances()[0]["fvd"] > 0.1
    one_clip = FeatureSets({"fvd": fvd}, torch.device("cpu"))
    one_clip.add(source[0], source[0])
    assert "FVD" in one_clip.distances()[1]  # one clip: no covariance, skipped with a reason
