"""The `score` pass: SyncNet confidence and AV offset on the aligned crops, then the sync filter.

It reads the ingest pass's committed shards and writes the final ones, task by task: a sample whose
confidence is below `min_confidence` or whose |offset| exceeds `max_offset` frames becomes a
reject; every other sample has its audio shifted by the measured offset, so the written sample is
in sync, and carries `sync_conf` / `av_offset` in its JSON and the manifest. The offset is measured
on the same aligned crops the model trains on (measuring before the alignment gives another
offset). Video and affine members are copied unchanged, not re-encoded.

Like ingest, each task writes its stats file last (the commit marker), so a rerun skips scored
tasks and a killed pass resumes without duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_jobs.config import DataJobConfig, ScoreConfig
from data_jobs.job import JobSummary, Layout, commit_task, finalize, require_ray
from data_jobs.manifest import manifest_row
from data_jobs.media import encode_wav
from data_jobs.writer import ShardWriter
from lipforcing import storage
from lipforcing.config import to_yaml
from lipforcing.data import FPS
from lipforcing.data.shards import Reader, decode_mp4, decode_wav, epoch_samples
from lipforcing.models.syncnet import SyncModel, SyncNetConfig, SyncNetV2, load_syncnet, score_clip

log = logging.getLogger("lipforcing.data")


@dataclass
class SyncVerdict:
    confidence: float
    offset: int
    reason: str | None  # None: keep


class SyncFilter:
    """Scores one sample and decides: keep (with the offset to correct) or a reject reason."""

    name = "score"

    def __init__(self, model: SyncModel, min_confidence: float, max_offset: int, vshift: int = 15):
        self.model, self.min_confidence, self.max_offset, self.vshift = model, min_confidence, max_offset, vshift

    def __call__(self, frames: np.ndarray, audio: np.ndarray) -> SyncVerdict:
        try:
            result = score_clip(self.model, torch.from_numpy(frames), audio, vshift=self.vshift)
        except ValueError as err:  # shorter than one SyncNet window
            return SyncVerdict(0.0, 0, f"unscorable: {err}")
        if abs(result.offset) > self.max_offset:
            return SyncVerdict(result.confidence, result.offset, "av_offset_too_large")
        if result.confidence < self.min_confidence:
            return SyncVerdict(result.confidence, result.offset, "low_sync_confidence")
        return SyncVerdict(result.confidence, result.offset, None)


def confidence_threshold(model: SyncModel, score: ScoreConfig) -> float:
    """The Sync-C threshold on the scale of the model that scores."""
    return score.min_confidence if isinstance(model, SyncNetV2) else score.min_confidence_ours


def shift_audio(audio: np.ndarray, offset: int, sample_rate: int) -> np.ndarray:
    """Undo a measured AV offset: a negative offset (audio lags the video) moves the audio earlier."""
    samples = abs(offset) * sample_rate // FPS
    if offset == 0 or samples == 0:
        return audio
    silence = np.zeros(samples, dtype=audio.dtype)
    if offset < 0:
        return np.concatenate([audio[samples:], silence])
    return np.concatenate([silence, audio[:-samples]])


def score_task(source_stats_url: str, config: DataJobConfig, weights: str) -> dict[str, Any]:
    """Score every sample of one ingest task; write its final shards, then its stats (commit marker)."""
    started = time.perf_counter()
    source = json.loads(storage.read_text(source_stats_url))
    task = source["task"]
    model = load_syncnet(SyncNetConfig(weights=weights), key="score.syncnet")
    sync = SyncFilter(model, confidence_threshold(model, config.score), config.score.max_offset)
    shards_url = storage.join(config.output, "shards")
    writer = ShardWriter(shards_url, task, config.write)
    rows = {row["key"]: row for row in source["samples"]}
    samples, rejects = [], list(source["rejects"])
    shard_root = os.path.dirname(os.path.dirname(source_stats_url))
    for shard in source["shards"]:
        url = storage.join(shard_root, "shards", f"{shard['name']}.tar")
        for sample in epoch_samples([url], Reader(), seed=0, epoch=0):
            key = sample["__key__"]
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            metadata = json.loads(members["json"])
            audio, rate = decode_wav(members["wav"])
            verdict = sync(decode_mp4(members["mp4"]), audio)
            if verdict.reason is not None:
                rejects.append({
                    "source": metadata["source"], "dataset": metadata["dataset"], "stage": "score",
                    "reason": verdict.reason.split(":")[0],
                    "detail": f"sync_conf={verdict.confidence:.3f} av_offset={verdict.offset} ({verdict.reason})",
                    "start_s": metadata["start_s"], "end_s": metadata["end_s"],
                })  # fmt: skip
                continue
            metadata.update(sync_conf=round(verdict.confidence, 4), av_offset=verdict.offset,
                            audio_shift_s=-verdict.offset / FPS)  # fmt: skip
            members["wav"] = encode_wav(shift_audio(audio, verdict.offset, rate), rate)
            members["json"] = json.dumps(metadata).encode()
            written_to = writer.add(key, members)
            samples.append({**rows.get(key, {}), **manifest_row(metadata, written_to)})
    fields = {**source, "timings_s": {**source["timings_s"], "score": time.perf_counter() - started}, "scored_with": weights}
    return commit_task(Layout(config.output).stats_url(task), writer.close(), samples, rejects, **fields)


def score_plan(config: DataJobConfig) -> tuple[list[str], list[str]]:
    """(the stats URL of every committed ingest task under <output>/aligned, those not scored yet)."""
    layout = Layout(config.output)
    sources = storage.glob(storage.join(config.output, "aligned", "stats", "*.json"))
    return sources, [u for u in sources if not storage.exists(layout.stats_url(_task(u)))]


def run_score_pass(config: DataJobConfig, weights: str, started: float) -> JobSummary:
    """Score the pending ingest tasks on Ray (already initialised) with the SyncNet at `weights`,
    then rebuild the final tables from every task's commit marker."""
    import ray

    layout = Layout(config.output)
    sources, pending = score_plan(config)
    log.info("score: %d tasks, %d already scored, %d to score", len(sources), len(sources) - len(pending), len(pending))
    if pending:
        require_ray()
        remote = ray.remote(score_task).options(num_cpus=config.execution.num_cpus_per_task)
        ray.get([remote.remote(url, config, weights) for url in pending])
    stats = [json.loads(storage.read_text(layout.stats_url(_task(u)))) for u in sources]
    storage.write_text(layout.file("config.yaml"), to_yaml(config))
    return finalize(layout, stats, time.perf_counter() - started, len(pending))


def _task(stats_url: str) -> str:
    return os.path.basename(stats_url)[: -len(".json")]
