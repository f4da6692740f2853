"""The data job's SyncNet score pass: offset recovery on the planted clip, correction or drop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_jobs.config import DataJobConfig
from data_jobs.job import Layout, read_markers
from data_jobs.score import build_filter, confidence_threshold, score_task, shift_audio
from lipforcing import storage
from lipforcing.data.shards import Reader, decode_clip, epoch_samples, shard_urls
from lipforcing.models.syncnet import StableSyncNet, SyncNetConfig, SyncNetV2, load_syncnet, score_clip
from pipelines.jobs import resolve_config

PLANTED = "vox_offset_0p4s"  # the sample clip whose audio lags its video by 0.4 s = 10 frames


def test_shift_audio_moves_lagging_audio_earlier():
    audio = np.arange(1, 2001, dtype=np.float32)  # 2000 samples = 3.125 frames at 640 samples/frame
    earlier = shift_audio(audio, -2, 16000)
    assert np.array_equal(earlier[:-1280], audio[1280:]) and not earlier[-1280:].any()
    later = shift_audio(audio, 1, 16000)
    assert not later[:640].any() and np.array_equal(later[640:], audio[:-640])
    assert shift_audio(audio, 0, 16000) is audio


def score_all(sample_shards: str, weights: str, output: str, *overrides: str) -> list[dict]:
    config = resolve_config(DataJobConfig, ["profile=tiny", f"output={output}", *overrides])
    sync = build_filter(config, weights)
    return [score_task(source, Layout(sample_shards), config, sync, weights) for source in read_markers(Layout(sample_shards).stats).values()]


@pytest.mark.integration
def test_confidence_threshold_follows_the_scoring_model():
    """syncnet_v2's Sync-C scale (3.0 in the paper) would reject every clip scored by our SyncNet,
    whose unit-vector confidences stay below 2; each model gets its own threshold."""
    score = resolve_config(DataJobConfig, ["profile=1.3b"]).score
    assert confidence_threshold(SyncNetV2(), score) == 3.0
    assert confidence_threshold(StableSyncNet(SyncNetConfig()), score) == score.min_confidence_ours < 2.0


def test_trained_syncnet_recovers_the_planted_offset(sample_shards, trained_syncnet):
    model = load_syncnet(SyncNetConfig(weights=trained_syncnet))
    found = {}
    for sample in epoch_samples(shard_urls(sample_shards), Reader(), 0, 0):
        clip = decode_clip(sample)
        name = clip.metadata["source"].rsplit("/", 1)[-1]
        found.setdefault(name, score_clip(model, torch.from_numpy(clip.frames), clip.audio).offset)
    assert abs(found[f"{PLANTED}.mp4"] - (-10)) <= 1  # audio lags by 10 frames
    in_sync = [offset for name, offset in found.items() if not name.startswith(PLANTED)]
    assert sum(abs(offset) <= 1 for offset in in_sync) >= len(in_sync) - 1


@pytest.mark.integration
def test_score_pass_drops_a_large_offset_by_default(sample_shards, trained_syncnet, tmp_path):
    stats = score_all(sample_shards, trained_syncnet, str(tmp_path))
    rejects = [r for s in stats for r in s["rejects"] if r["stage"] == "score"]
    planted = [r for r in rejects if PLANTED in r["source"]]
    assert planted and planted[0]["reason"] == "av_offset_too_large"
    kept = [row for s in stats for row in s["samples"]]
    assert kept and all(row["sync_conf"] is not None and abs(row["av_offset"]) <= 6 for row in kept)
    assert all(PLANTED not in row["source"] for row in kept)
    assert storage.glob(storage.join(str(tmp_path), "stats", "*.json"))  # commit markers written last


@pytest.mark.integration
def test_score_pass_corrects_the_offset_when_allowed(sample_shards, trained_syncnet, tmp_path):
    stats = score_all(sample_shards, trained_syncnet, str(tmp_path), "score.max_offset=12")
    rows = [row for s in stats for row in s["samples"] if PLANTED in row["source"]]
    assert rows and abs(rows[0]["av_offset"] + 10) <= 1
    model = load_syncnet(SyncNetConfig(weights=trained_syncnet))
    for sample in epoch_samples(shard_urls(str(tmp_path)), Reader(), 0, 0):
        metadata = json.loads(sample["json"])
        if PLANTED in metadata["source"]:
            clip = decode_clip(sample)
            assert metadata["av_offset"] == rows[0]["av_offset"]
            assert abs(score_clip(model, torch.from_numpy(clip.frames), clip.audio).offset) <= 1  # now in sync
            break
    else:
        pytest.fail("the corrected planted clip is missing from the scored shards")


@pytest.mark.integration
def test_one_undecodable_sample_is_a_score_reject_and_the_rest_is_scored(sample_shards, trained_syncnet, tmp_path):
    """The per-sample guard: a garbled mp4 member turns into a `score/error` row for that sample;
    the task's other samples are scored and written as usual."""
    import io
    import shutil
    import tarfile

    source = next(m for m in read_markers(Layout(sample_shards).stats).values() if sum(s["samples"] for s in m["shards"]) >= 2)
    aligned = Layout(str(tmp_path / "aligned"))
    broken_key = source["shards"][0]["keys"][0]
    for shard in source["shards"]:
        original = Layout(sample_shards).shard_url(shard["name"], shard["split"])
        copy = aligned.shard_url(shard["name"], shard["split"])
        storage.makedirs(copy.rsplit("/", 1)[0])
        if shard is not source["shards"][0]:
            shutil.copy(original, copy)
            continue
        with tarfile.open(original) as tar_in, tarfile.open(copy, "w", format=tarfile.USTAR_FORMAT) as tar_out:
            for member in tar_in.getmembers():
                data = tar_in.extractfile(member).read()
                if member.name == f"{broken_key}.mp4":
                    data = b"\x00" * 64 + data[64:][::-1]  # no longer an mp4
                member.size = len(data)
                tar_out.addfile(member, io.BytesIO(data))
    config = resolve_config(DataJobConfig, ["profile=tiny", f"output={tmp_path / 'final'}", "score.max_offset=12"])
    stats = score_task(source, aligned, config, build_filter(config, trained_syncnet), trained_syncnet)
    errors = [r for r in stats["rejects"] if r["stage"] == "score"]
    broken = next(row for row in source["samples"] if row["key"] == broken_key)
    assert [r["reason"] for r in errors] == ["error"]
    assert (errors[0]["source"], errors[0]["start_s"]) == (broken["source"], broken["start_s"])
    kept = {row["key"] for row in stats["samples"]}
    expected = {k for s in source["shards"] for k in s["keys"]} - {broken_key}
    assert kept == expected  # max_offset=12 keeps every other sample, the planted one included
