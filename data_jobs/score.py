"""The `score` pass: SyncNet confidence and AV offset on the aligned crops, then the sync filter.

It reads the ingest pass's committed shards and writes the final ones, task by task: a sample whose
confidence is below `min_confidence` or whose |offset| exceeds `max_offset` frames becomes a
reject; every other sample has its audio shifted by the measured offset, so the written sample is
in sync, and carries `sync_conf` / `av_offset` in its JSON and the manifest. The offset is measured
on the same aligned crops the model trains on (measuring before the alignment gives another
offset). Video and affine members are copied unchanged, not re-encoded.

Like ingest, each task writes its final marker last, so a rerun skips scored tasks and a killed
pass resumes without duplicates. A task is scored again when its ingest task changed (inputs,
config hash) or the score settings did (`score_hash`). The SyncNet runs in long-lived
`ScoreWorker` actors (Ray Data), loaded once per actor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_jobs.config import DataJobConfig, ScoreConfig
from data_jobs.job import (
    JobSummary,
    Layout,
    SplitWriters,
    commit_failure,
    commit_task,
    finalize,
    guarded,
    node_name,
    progress_row,
    read_if_present,
    read_markers,
    remove_stale,
    require_ray,
    run_until_committed,
    worker_device,
)
from data_jobs.manifest import manifest_row, read_table
from data_jobs.media import encode_wav
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


def score_hash(score: ScoreConfig) -> str:
    """What makes a scored task stale: the SyncNet as configured and the thresholds. (A registered
    alias that moves to a new version does not rescore; pin `models:/name/<version>` to follow it.)"""
    chosen = {k: getattr(score, k) for k in ("syncnet", "min_confidence", "min_confidence_ours", "max_offset")}
    return hashlib.sha1(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def build_filter(config: DataJobConfig, weights: str, device: str = "cpu") -> SyncFilter:
    model = load_syncnet(SyncNetConfig(weights=weights), key="score.syncnet").to(device)
    return SyncFilter(model, confidence_threshold(model, config.score), config.score.max_offset)


def score_task(source: dict[str, Any], aligned: Layout, config: DataJobConfig, sync: SyncFilter, weights: str) -> dict[str, Any]:
    """Score every sample of one committed ingest task (its marker `source`, its shards under
    `aligned`); write its final shards, then its final marker. One sample that cannot be decoded
    or scored is a reject row."""
    started = time.perf_counter()
    layout = Layout(config.output)
    task = source["task"]
    writers = SplitWriters(layout, task, config)
    rows = {row["key"]: row for row in source["samples"]}
    samples, rejects = [], list(source["rejects"])
    for shard in source["shards"]:
        url = aligned.shard_url(shard["name"], shard.get("split", "train"))
        for sample, decoded in decoded_ahead(epoch_samples([url], Reader(), seed=0, epoch=0)):
            key, row = sample["__key__"], rows.get(sample["__key__"], {})
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            try:
                verdict, members = _scored(sync, members, *decoded.result())
            except Exception as err:  # one sample the decoders or the model choke on: this sample only
                verdict, detail = None, f"{type(err).__name__}: {err}"[:500]
            else:
                detail = f"sync_conf={verdict.confidence:.3f} av_offset={verdict.offset} ({verdict.reason})"
            if verdict is None or verdict.reason is not None:
                rejects.append({
                    "source": row.get("source", key), "dataset": row.get("dataset", ""), "stage": "score",
                    "reason": "error" if verdict is None else verdict.reason.split(":")[0], "detail": detail,
                    "start_s": row.get("start_s"), "end_s": row.get("end_s"),
                })  # fmt: skip
                continue
            metadata = json.loads(members["json"])
            written_to = writers.add(shard.get("split", "train"), key, members)
            samples.append({**row, **manifest_row(metadata, written_to)})
    shards = writers.close()
    timings = {**source["timings_s"], "score": time.perf_counter() - started, "upload": source["timings_s"].get("upload", 0.0) + writers.upload_s}
    fields = {**source, "timings_s": timings, "scored_with": weights, "score_hash": score_hash(config.score), "node": node_name()}
    return commit_task(layout.stats_url(task), shards, samples, rejects, **fields)


def decoded_ahead(samples: Iterator[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Future]]:
    """Each sample with its decode (frames, audio, rate) running one sample ahead in a helper
    thread, so the SyncNet (on a GPU especially) does not wait for the decoders."""
    with ThreadPoolExecutor(1) as pool:
        previous = None
        for sample in samples:
            current = (sample, pool.submit(_decode, sample))
            if previous is not None:
                yield previous
            previous = current
        if previous is not None:
            yield previous


def _decode(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, int]:
    audio, rate = decode_wav(sample["wav"])
    return decode_mp4(sample["mp4"]), audio, rate


def _scored(sync: SyncFilter, members: dict[str, bytes], frames: np.ndarray, audio: np.ndarray, rate: int) -> tuple[SyncVerdict, dict[str, bytes]]:
    """The verdict on one decoded sample and, when kept, its members with the audio put in sync."""
    metadata = json.loads(members["json"])
    verdict = sync(frames, audio)
    if verdict.reason is None:
        metadata.update(sync_conf=round(verdict.confidence, 4), av_offset=verdict.offset,
                        audio_shift_s=-verdict.offset / FPS)  # fmt: skip
        members = {**members, "wav": encode_wav(shift_audio(audio, verdict.offset, rate), rate),
                   "json": json.dumps(metadata).encode()}  # fmt: skip
    return verdict, members


class ScoreWorker:
    """A long-lived scoring actor: the SyncNet loads once (on a GPU with `execution.score_num_gpus`),
    then one ingest task per call."""

    def __init__(self, config: DataJobConfig, weights: str):
        torch.set_num_threads(max(1, int(config.execution.num_cpus_per_task)))
        self.config, self.weights = config, weights
        self.sync = build_filter(config, weights, worker_device(config.execution.score_num_gpus))
        self.aligned, self.layout = Layout(storage.join(config.output, "aligned")), Layout(config.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [progress_row(self.run(name)) for name in batch["task"]]
        return {key: [row[key] for row in rows] for key in ("task", "samples", "reasons")}

    def run(self, task: str) -> dict[str, Any]:
        source = json.loads(storage.read_text(self.aligned.stats_url(task)))
        url, done = self.layout.stats_url(task), {}
        if read_if_present(url, done) and _is_current(done[task], source, self.config):  # a retried block's finished task
            return done[task]
        if source.get("failed"):  # ingest could not finish it: its failure carries over, retried next run
            return commit_task(url, [], [], source["rejects"], **{**source, "score_hash": score_hash(self.config.score)})
        fields = {k: source[k] for k in ("config_hash", "inputs")}
        return guarded(url, task, input_rows(source), self.config.execution.task_attempts,
                       lambda: score_task(source, self.aligned, self.config, self.sync, self.weights), **fields)  # fmt: skip


def input_rows(source: dict[str, Any]) -> list[dict[str, str]]:
    """The inputs of an ingest task with their dataset tags (for rows that reject them whole)."""
    tags = {row["source"]: row["dataset"] for row in source["samples"] + source["rejects"]}
    return [{"source": video, "dataset": tags.get(video, "")} for video in source["inputs"]]


def _is_current(final: dict[str, Any], source: dict[str, Any], config: DataJobConfig) -> bool:
    """A final marker that needs no new scoring: same inputs and ingest config, same score settings."""
    return (not final.get("failed") and final.get("score_hash") == score_hash(config.score)
            and final["inputs"] == source["inputs"] and final["config_hash"] == source["config_hash"])  # fmt: skip


def score_plan(config: DataJobConfig) -> tuple[dict[str, dict], dict[str, dict], list[str]]:
    """(every committed ingest marker under <output>/aligned, every final marker, the tasks to score):
    a task is scored again when its final marker is missing, failed or made with other inputs,
    another ingest config or other score settings."""
    sources = read_markers(Layout(storage.join(config.output, "aligned")).stats)
    finals = read_markers(Layout(config.output).stats)
    pending = [name for name, source in sorted(sources.items())
               if name not in finals or source.get("failed") or not _is_current(finals[name], source, config)]  # fmt: skip
    return sources, finals, pending


def run_score_pass(config: DataJobConfig, weights: str, started: float, plan: tuple[dict, dict, list[str]]) -> JobSummary:
    """Score the pending tasks of `plan` (`score_plan`'s) with `ScoreWorker` actors on Ray (already
    initialised) and the SyncNet at `weights`, then rebuild the final tables from every final marker."""
    layout = Layout(config.output)
    sources, finals, pending = plan
    log.info("score: %d tasks, %d already scored, %d to score", len(sources), len(sources) - len(pending), len(pending))
    if pending:
        require_ray()
        build_filter(config, weights)  # a broken SyncNet file stops the pass here, before any work
    fresh = run_until_committed(ScoreWorker, {name: name for name in pending}, (config, weights), config,
                                config.execution.score_num_gpus, "score", layout.stats) if pending else {}  # fmt: skip
    for name in pending:
        if name not in fresh:  # its worker died in every round
            source = sources[name]
            fresh[name] = commit_failure(layout.stats_url(name), name, input_rows(source), "worker_died",
                                         "the worker scoring this task died on every attempt",
                                         config_hash=source["config_hash"], inputs=source["inputs"])  # fmt: skip
    stats = {name: fresh.get(name) or finals[name] for name in sources}
    remove_stale(layout, stats, finals)
    storage.write_text(layout.file("config.yaml"), to_yaml(config))
    listing = read_table(storage.join(config.output, "aligned", "rejects.parquet"))
    listing_rejects = listing[listing["stage"] == "input"].to_dict("records")
    return finalize(layout, list(stats.values()), listing_rejects, time.perf_counter() - started, len(pending),
                    config.execution.max_failure_share)  # fmt: skip
