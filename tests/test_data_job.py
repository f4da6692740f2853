"""The data job end to end on a real local Ray: the embedded sample, the local S3 server, a killed
and resumed run, and (when ../shared/data/real exists) real talking-head clips.

One Ray session and one generated sample serve the whole module; clips are short.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pandas as pd
import pytest
import soundfile

from data_jobs.align import template_points
from data_jobs.config import DataJobConfig
from data_jobs.faces import DlibBackend
from data_jobs.job import run_data_job
from data_jobs.manifest import read_table
from data_jobs.media import probe_media
from lipforcing import storage
from lipforcing.config import ConfigError
from lipforcing.data.shards import decode_mp4
from pipelines.jobs import resolve_config
from tests.conftest import REAL_DATA, kill_data_job_once

pytestmark = pytest.mark.integration
SIZE = 256  # the tiny profile's crop size


@pytest.fixture(scope="module")
def sample_expectations(sample_list) -> dict[str, str]:
    rows = csv.DictReader(io.StringIO(storage.read_text(sample_list)))
    return {row["video"].rsplit("/", 1)[-1]: row for row in rows}


def job_config(*overrides: str) -> DataJobConfig:
    return resolve_config(DataJobConfig, ["profile=tiny", "execution.progress=false", *overrides])


def shard_members(output: str) -> dict[str, dict[str, bytes]]:
    """Every sample in every shard: key -> {extension: bytes}; fails on a duplicate key."""
    samples: dict[str, dict[str, bytes]] = {}
    for url in storage.glob(storage.join(output, "shards", "*.tar")):
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
            seen_here = set()
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                assert (key, extension) not in seen_here
                seen_here.add((key, extension))
                if extension == "mp4":
                    assert key not in samples, f"duplicate key {key}"
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def outcome_by_source(manifest: pd.DataFrame, rejects: pd.DataFrame) -> dict[str, str]:
    outcome = {}
    for source, group in manifest.groupby("source"):
        outcome[source.rsplit("/", 1)[-1]] = f"samples={len(group)}"
    for row in rejects.itertuples():
        name = row.source.rsplit("/", 1)[-1]
        if name not in outcome:
            outcome[name] = f"reject={row.stage}/{row.reason}"
    return outcome


def test_sample_job_writes_aligned_25fps_samples_and_accounts_for_every_input(sample_job, sample_expectations):
    output, summary = sample_job
    manifest = read_table(storage.join(output, "manifest.parquet"))
    heldout = read_table(storage.join(output, "heldout", "manifest.parquet"))
    every = pd.concat([manifest, heldout], ignore_index=True)
    rejects = read_table(storage.join(output, "rejects.parquet"))
    assert outcome_by_source(every, rejects) == {
        name: row["expect"] for name, row in sample_expectations.items()
    }
    assert set(manifest["dataset"]) == {"hdtf", "voxceleb2", "hallo3"}
    assert every["sync_conf"].isna().all() and every["av_offset"].isna().all()
    assert (every["iqa"] >= 40).all()
    # The list holds one face out (data_jobs/sample.py): its samples only in heldout/, and no
    # identity on both sides; rejects keep the split of their input.
    assert set(heldout["identity"]) == {"t1c"} and (heldout["split"] == "heldout").all()
    assert (manifest["split"] == "train").all() and not set(manifest["identity"]) & set(heldout["identity"])
    assert set(rejects[rejects["identity"] == "t1c"]["split"]) == {"heldout"}

    # The summary adds up: every input is rejected whole or cut into shots; every segment is
    # written or rejected.
    assert summary.inputs == len(sample_expectations)
    inputs_segmented = rejects[rejects["start_s"].notna()]["source"].nunique()
    assert summary.inputs_rejected == (rejects["start_s"].isna()).sum() == 4
    assert (
        len(set(every["source"]) | set(rejects[rejects["start_s"].notna()]["source"]))
        == summary.inputs - 4
    )
    assert inputs_segmented >= 1
    assert summary.segments == summary.written + summary.segments_rejected == len(every) + 3
    assert summary.written == len(every) == 11 and summary.shots_dropped == 1
    assert summary.heldout == len(heldout) == 3
    assert sum(summary.reasons.values()) == len(rejects)
    assert summary.clip_seconds_out == pytest.approx((every["num_frames"] / 25).sum())

    # Every written sample: 25 fps, SIZE x SIZE, 16 kHz mono, 5-10 s, face on the template.
    samples = shard_members(output)
    assert sorted(samples) == sorted(manifest["key"])
    samples |= shard_members(storage.join(output, "heldout"))
    assert sorted(samples) == sorted(every["key"])
    backend, template = DlibBackend(), template_points("loose", SIZE)
    stats_hashes = {
        json.loads(storage.read_text(u))["config_hash"] for u in storage.glob(f"{output}/stats/*.json")
    }
    assert len(stats_hashes) == 1
    for row in every.itertuples():
        members = samples[row.key]
        assert set(members) == {"mp4", "wav", "json", "affine.npy"}
        metadata = json.loads(members["json"])
        assert metadata["config_hash"] in stats_hashes and metadata["key"] == row.key
        assert (metadata["identity"], metadata["split"]) == (row.identity, row.split)
        assert 125 <= row.num_frames <= 250 and row.fps == 25 and row.width == row.height == SIZE
        frames = decode_mp4(members["mp4"])
        assert frames.shape == (row.num_frames, SIZE, SIZE, 3)
        audio, rate = soundfile.read(io.BytesIO(members["wav"]))
        assert rate == 16000 and audio.ndim == 1 and len(audio) == row.num_frames * 640
        affines = np.load(io.BytesIO(members["affine.npy"]))
        assert affines.shape == (row.num_frames, 2, 3) and affines.dtype == np.float32
        middle = frames[len(frames) // 2]
        faces = sorted(backend.detect(middle), key=lambda f: f.area, reverse=True)
        assert faces, f"no face found again in the aligned crop of {row.key}"
        landmarks = backend.refine(middle, faces[0].box)
        error = np.linalg.norm(landmarks - template, axis=1).mean()
        assert error < 0.05 * SIZE, f"{row.key}: landmarks {error:.1f} px from the template"


def test_sample_job_output_contract(sample_job):
    output, _ = sample_job
    for name in ("config.yaml", "manifest.parquet", "rejects.parquet", "summary.json"):
        assert storage.exists(storage.join(output, name))
    config_text = storage.read_text(storage.join(output, "config.yaml"))
    assert f"output: {output}" in config_text and "size: 256" in config_text
    stats = [json.loads(storage.read_text(u)) for u in storage.glob(f"{output}/stats/*.json")]
    assert len(stats) == 5  # 15 inputs, 3 per task
    for folder, split in (("shards", "train"), ("heldout/shards", "heldout")):  # held out: t1c's clip
        listed = {s["name"] for task in stats for s in task["shards"] if s["split"] == split}
        assert {u.rsplit("/", 1)[-1][:-4] for u in storage.glob(f"{output}/{folder}/*.tar")} == listed != set()
    assert all(set(task["timings_s"]) >= {"probe", "resample", "shots"} for task in stats)
    rejects = read_table(storage.join(output, "rejects.parquet"))
    assert list(rejects.columns)[:6] == ["source", "dataset", "stage", "reason", "detail", "start_s"]
    assert rejects["detail"].str.len().gt(0).all()


def test_rerun_skips_committed_work_and_refuses_a_different_config(sample_job, sample_list, tmp_path):
    output = str(tmp_path / "data")
    shutil.copytree(sample_job[0], output)  # a copy: the rerun rewrites summary.json and config.yaml
    before = read_table(storage.join(output, "manifest.parquet"))
    again = run_data_job(job_config(f"input={sample_list}", f"output={output}", "write.inputs_per_task=3"))
    assert again.tasks_run == 0 and again.tasks_skipped == 5
    pd.testing.assert_frame_equal(read_table(storage.join(output, "manifest.parquet")), before)
    with pytest.raises(ConfigError, match="config hash"):
        run_data_job(
            job_config(
                f"input={sample_list}", f"output={output}", "write.inputs_per_task=3", "align.size=128"
            )
        )


def test_sample_job_on_the_local_s3_server(local_ray, s3_bucket, sample_list, sample_job):
    """Input and output on S3: a folder of videos (the silent clip's wav is paired by name)."""
    sample_root = sample_list.rsplit("/", 1)[0]
    names = [
        "hdtf_silent_paired_wav.mp4",
        "hdtf_silent_paired_wav.wav",
        "bad_text_named_mp4.mp4",
        "short_4s.mp4",
    ]
    for name in names:
        storage.upload_file(f"{sample_root}/videos/{name}", f"{s3_bucket}/raw/videos/{name}")
    summary = run_data_job(
        job_config(f"input={s3_bucket}/raw", f"output={s3_bucket}/shards", "write.inputs_per_task=2")
    )
    assert summary.inputs == 3 and summary.written == 1
    manifest = read_table(f"{s3_bucket}/shards/manifest.parquet")
    rejects = read_table(f"{s3_bucket}/shards/rejects.parquet")
    assert manifest["source"].tolist() == [f"{s3_bucket}/raw/videos/hdtf_silent_paired_wav.mp4"]
    assert manifest["dataset"].tolist() == ["videos"]  # the first folder under the input root
    assert sorted(zip(rejects["stage"], rejects["reason"])) == [
        ("probe", "unreadable"),
        ("shots", "shot_too_short"),
    ]
    # Keys depend on the path under the input root, so the S3 copy gives the local run's key.
    local_manifest = read_table(storage.join(sample_job[0], "manifest.parquet"))
    assert set(manifest["key"]) <= set(local_manifest["key"])
    assert sorted(shard_members(f"{s3_bucket}/shards")) == manifest["key"].tolist()
    assert storage.exists(f"{s3_bucket}/shards/config.yaml")


def test_killed_job_resumes_to_the_same_keys(local_ray, sample_list, sample_job, tmp_path, monkeypatch):
    sample_root = sample_list.rsplit("/", 1)[0]
    chosen = ["bad_empty.mp4", "hdtf_astronaut_25fps.mp4", "short_4s.mp4", "vox_offset_0p4s.mp4"]
    rows = [
        r
        for r in csv.DictReader(io.StringIO(storage.read_text(sample_list)))
        if r["video"].rsplit("/", 1)[-1] in chosen
    ]
    subset = f"{sample_root}/subset.csv"
    pd.DataFrame(rows).to_csv(subset, index=False)
    output = str(tmp_path / "data")
    argv = [f"input={subset}", f"output={output}", "write.inputs_per_task=1", "execution.concurrency=1"]
    argv.append("score.enabled=false")  # the ingest pass alone: the SyncNet pass has its own tests
    committed_at_kill = kill_data_job_once(argv, f"{output}/stats/*.json", f"{tmp_path}/killed.db", timeout=180)
    assert committed_at_kill < 4

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/resumed.db")
    from pipelines.data import main

    assert main(job_config(*argv)) == 0
    summary = json.loads(storage.read_text(f"{output}/summary.json"))
    assert summary["tasks_skipped"] == committed_at_kill and summary["tasks_run"] == 4 - committed_at_kill
    manifest = read_table(f"{output}/manifest.parquet")
    full = read_table(storage.join(sample_job[0], "manifest.parquet"))
    expected = full[full["source"].str.rsplit("/", n=1).str[-1].isin(chosen)]
    assert sorted(manifest["key"]) == sorted(expected["key"])
    assert sorted(shard_members(output)) == sorted(manifest["key"])  # no duplicates, no stray shards
    assert not [f for f in os.listdir(f"{output}/shards") if f.startswith(".")]
    rejects = read_table(f"{output}/rejects.parquet")
    assert sorted(rejects["reason"]) == ["empty_file", "shot_too_short"]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/resumed.db")
    runs = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="attributes.run_name = 'data'")
    assert len(runs) == 1 and runs["metrics.written"].iloc[0] == 2
    assert runs["params.align.size"].iloc[0] == "256"


@pytest.mark.skipif(
    not REAL_DATA.is_dir(), reason=f"real clips not present at {REAL_DATA} (a fresh checkout has none)"
)
def test_real_clips(local_ray, tmp_path):
    rows = [
        {"video": str(REAL_DATA / f"vr_face{i}.mp4"), "audio": "", "dataset": "real"} for i in range(1, 6)
    ]
    rows += [{"video": str(REAL_DATA / f"mt_{n}.mp4"), "audio": str(REAL_DATA / f"mt_{n}.wav"), "dataset": "musetalk"}
             for n in ("sun", "yongen")]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "real.csv", index=False)
    output = str(tmp_path / "data")
    summary = run_data_job(
        job_config(f"input={tmp_path}/real.csv", f"output={output}", "write.inputs_per_task=1")
    )
    manifest = read_table(f"{output}/manifest.parquet")
    rejects = read_table(f"{output}/rejects.parquet")
    assert summary.inputs == 7
    by_source = dict(list(manifest.groupby(manifest["source"].str.rsplit("/", n=1).str[-1])))
    short = rejects[rejects["source"].str.endswith("vr_face5.mp4")]
    assert short[["stage", "reason"]].values.tolist() == [["shots", "shot_too_short"]]
    assert "vr_face5.mp4" not in by_source
    for row in rows[:4] + rows[5:]:
        name = row["video"].rsplit("/", 1)[-1]
        assert name in by_source, (
            f"{name} gave no sample: {rejects[rejects['source'] == row['video']].to_dict('records')}"
        )
    for name in ("mt_sun.mp4", "mt_yongen.mp4"):  # audio-less videos, paired with their wav by the list
        assert by_source[name]["dataset"].unique().tolist() == ["musetalk"]
    fps_by_name = {n: probe_media(str(REAL_DATA / n)).fps for n in by_source}
    assert min(fps_by_name.values()) < 23 and max(fps_by_name.values()) > 29  # 22.13 and 30 fps inputs
    samples = shard_members(output)
    for name, group in by_source.items():
        paired = REAL_DATA / name.replace(".mp4", ".wav")
        durations = [probe_media(str(REAL_DATA / name)).duration_s]
        durations += [probe_media(str(paired)).duration_s] if name.startswith("mt_") else []
        covered = group["num_frames"].sum() / 25
        if not rejects["source"].str.endswith(name).any():  # no dropped shot: the clip is covered whole
            assert covered == pytest.approx(min(durations), abs=0.12), (
                name
            )  # as long as video and audio overlap
        for row in group.itertuples():
            frames = decode_mp4(samples[row.key]["mp4"])
            assert frames.shape[0] == row.num_frames and 125 <= row.num_frames <= 250
            assert frames.shape[1:3] == (SIZE, SIZE)


def mouth_audio_lag(frames: np.ndarray, audio: np.ndarray, size: int) -> int:
    """Video-frame lag at which audio energy best matches mouth opening (> 0: audio comes later)."""
    left, right = template_points("loose", size)[3:5]
    x0, x1 = int(left[0]), int(right[0])
    y0, y1 = int(left[1] - 0.02 * size), int(left[1] + 0.08 * size)
    darkness = 255.0 - frames[:, y0:y1, x0:x1].mean(axis=(1, 2, 3))
    energy = np.sqrt((audio[: len(frames) * 640].reshape(len(frames), 640) ** 2).mean(1))
    darkness, energy = (darkness - darkness.mean()) / darkness.std(), (energy - energy.mean()) / energy.std()
    lags = range(-15, 16)
    scores = [
        np.mean(
            darkness[max(0, -k) : len(darkness) - max(0, k)] * energy[max(0, k) : len(energy) - max(0, -k)]
        )
        for k in lags
    ]
    return list(lags)[int(np.argmax(scores))]


def test_sample_mouths_follow_the_audio_with_the_planted_shift(sample_job, sample_expectations):
    """What the SyncNet stage relies on: mouth opening tracks audio energy frame by frame in every
    written sample, and the planted clip's audio lags by its recorded shift (0.4 s = 10 frames)."""
    output, _ = sample_job
    manifest = read_table(storage.join(output, "manifest.parquet"))
    samples = shard_members(output)
    for row in manifest.itertuples():
        shift_frames = round(float(sample_expectations[row.source.rsplit("/", 1)[-1]]["audio_shift_s"]) * 25)
        audio, _ = soundfile.read(io.BytesIO(samples[row.key]["wav"]))
        lag = mouth_audio_lag(decode_mp4(samples[row.key]["mp4"]).astype(np.float64), audio, SIZE)
        assert abs(lag - shift_frames) <= 1, f"{row.key}: lag {lag} frames, planted {shift_frames}"
