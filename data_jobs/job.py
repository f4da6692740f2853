"""The data job: raw videos -> aligned WebDataset shards, distributed over Ray, resumable.

Work plan: inputs sorted by URL are cut into tasks of `write.inputs_per_task` consecutive files;
task i writes `shards/<name>-<i:06d>-<part:02d>.tar` and then, last, `stats/<name>-<i:06d>.json`,
its commit marker (video2dataset's incremental mode). Sample keys come from the source path and the
segment's first frame. So a rerun (after a crash, a kill or on purpose) runs exactly the tasks
without a matching commit marker, rewrites the same shard names with the same keys, and rebuilds
the Parquet tables from the markers: no duplicates, no partial shards left visible.

Ingest transforms, in order:
  per input:    probe -> resample -> shots
  per segment:  faces -> align -> iqa -> encode -> shard writer
The SyncNet score pass (`score.py`) runs after ingest, over its committed shards.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_jobs.config import HASH_EXCLUDE, DataJobConfig
from data_jobs.ingest import STAGE_ORDER, ingest_inputs
from data_jobs.inputs import InputItem, list_inputs
from data_jobs.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA, write_table
from data_jobs.writer import ShardWriter
from lipforcing import storage
from lipforcing.config import ConfigError, config_hash, to_yaml

log = logging.getLogger("lipforcing.data")


def data_config_hash(config: DataJobConfig) -> str:
    """Hash of what shapes the data (not where it goes or how many workers make it)."""
    return config_hash(config, exclude=HASH_EXCLUDE)


@dataclass
class Layout:
    """Where everything of one output lives."""

    root: str

    @property
    def shards(self) -> str:
        return storage.join(self.root, "shards")

    @property
    def stats(self) -> str:
        return storage.join(self.root, "stats")

    def stats_url(self, task: str) -> str:
        return storage.join(self.stats, f"{task}.json")

    def file(self, name: str) -> str:
        return storage.join(self.root, name)


def task_name(config: DataJobConfig, index: int) -> str:
    return f"{config.write.shard_name}-{index:06d}"


def plan_tasks(config: DataJobConfig, items: list[InputItem]) -> list[list[InputItem]]:
    size = max(1, config.write.inputs_per_task)
    return [items[i : i + size] for i in range(0, len(items), size)]


def process_task(index: int, items: list[InputItem], config: DataJobConfig, digest: str) -> dict[str, Any]:
    """Ingest a few inputs into this task's shards, then write its stats (the commit marker)."""
    import cv2

    cv2.setNumThreads(1)
    started = time.perf_counter()
    layout = Layout(config.output)
    name = task_name(config, index)
    writer = ShardWriter(layout.shards, name, config.write)
    result = ingest_inputs(items, config, digest, lambda item, key, members: writer.add(key, members))
    shards = writer.close()
    timings = {**result.timings_s, "upload": writer.upload_s}
    fields = {"task": name, "config_hash": digest, "inputs": [item.video for item in items], "clip_seconds_in": result.clip_seconds_in}
    return commit_task(layout.stats_url(name), shards, result.samples, result.rejects, timings_s=timings, wall_s=time.perf_counter() - started, **fields)


def commit_task(stats_url: str, shards: list[Any], samples: list[dict], rejects: list[dict], /, **fields: Any) -> dict[str, Any]:
    """Write a task's stats, its commit marker: what it wrote (shards and their keys, manifest and
    reject rows) plus `fields`. Written last, so a task without one is not done."""
    stats = {
        **fields,
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "keys": s.keys} for s in shards],
        "samples": samples,
        "rejects": rejects,
        "clip_seconds_out": sum(row["num_frames"] / row["fps"] for row in samples),
    }
    storage.write_text(stats_url, json.dumps(stats, indent=1))
    return stats


@dataclass
class JobSummary:
    inputs: int = 0
    inputs_rejected: int = 0
    segments: int = 0
    written: int = 0
    segments_rejected: int = 0
    shots_dropped: int = 0
    shards: int = 0
    clip_seconds_in: float = 0.0
    clip_seconds_out: float = 0.0
    wall_s: float = 0.0
    tasks_run: int = 0
    tasks_skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        lines = ["| count | value |", "|---|---:|"]
        for name in ("inputs", "inputs_rejected", "segments", "written", "segments_rejected", "shots_dropped",
                     "shards", "tasks_run", "tasks_skipped"):  # fmt: skip
            lines.append(f"| {name} | {getattr(self, name)} |")
        lines.append(f"| clip seconds in / out | {self.clip_seconds_in:.1f} / {self.clip_seconds_out:.1f} |")
        lines.append(f"| wall seconds | {self.wall_s:.1f} |")
        lines += ["", "| stage/reason | rejected |", "|---|---:|"]
        lines += [f"| {reason} | {count} |" for reason, count in sorted(self.reasons.items())]
        lines += ["", "| stage | worker seconds |", "|---|---:|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in self.timings_s.items()]
        return "\n".join(lines)


def summarize(stats: list[dict[str, Any]], wall_s: float, tasks_run: int) -> JobSummary:
    summary = JobSummary(wall_s=wall_s, tasks_run=tasks_run, tasks_skipped=len(stats) - tasks_run)
    reasons: Counter[str] = Counter()
    timings: Counter[str] = Counter()
    for task in stats:
        summary.inputs += len(task["inputs"])
        summary.written += len(task["samples"])
        summary.shards += len(task["shards"])
        summary.clip_seconds_in += task["clip_seconds_in"]
        summary.clip_seconds_out += task["clip_seconds_out"]
        timings.update(task["timings_s"])
        for row in task["rejects"]:
            reasons[f"{row['stage']}/{row['reason']}"] += 1
            if row["start_s"] is None:
                summary.inputs_rejected += 1
            elif row["stage"] == "shots":
                summary.shots_dropped += 1
            else:
                summary.segments_rejected += 1
    summary.segments = summary.written + summary.segments_rejected
    summary.reasons = dict(reasons)
    summary.timings_s = {stage: timings[stage] for stage in STAGE_ORDER if stage in timings}
    return summary


def require_ray() -> None:
    """The data job's passes run on a Ray the caller started (`pipelines.ray_cluster.init_ray`)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("the data job runs its tasks on Ray: start or join one first (pipelines.ray_cluster.init_ray)")


def run_data_job(config: DataJobConfig) -> JobSummary:
    """Plan, run the uncommitted tasks on Ray (already initialised), rebuild the tables, report."""
    import ray

    started = time.perf_counter()
    digest = data_config_hash(config)
    layout = Layout(config.output)
    _prepare_input(config)
    _check_iqa_weights(config)
    tasks = plan_tasks(config, list_inputs(config.input))
    committed = _committed(layout, config, tasks, digest)
    storage.makedirs(layout.shards)
    storage.makedirs(layout.stats)
    storage.write_text(layout.file("config.yaml"), to_yaml(config))
    pending = [i for i in range(len(tasks)) if i not in committed]
    log.info("data job %s: %d tasks, %d already committed, %d to run", digest, len(tasks), len(committed), len(pending))
    if pending:
        require_ray()
        _run_on_ray(ray, config, tasks, pending, digest)
    stats = [
        committed.get(i) or json.loads(storage.read_text(layout.stats_url(task_name(config, i))))
        for i in range(len(tasks))
    ]
    _remove_stale(layout, config, stats, len(tasks))
    return finalize(layout, stats, time.perf_counter() - started, len(pending))


def finalize(layout: Layout, stats: list[dict[str, Any]], wall_s: float, tasks_run: int) -> JobSummary:
    """Rebuild the Parquet tables and the summary from the committed per-task stats."""
    write_table(
        [r for s in stats for r in s["samples"]], MANIFEST_SCHEMA, layout.file("manifest.parquet"), ["key"]
    )
    write_table([r for s in stats for r in s["rejects"]], REJECTS_SCHEMA, layout.file("rejects.parquet"),
                ["source", "stage", "start_s"])  # fmt: skip
    summary = summarize(stats, wall_s, tasks_run)
    storage.write_text(layout.file("summary.json"), json.dumps(summary.__dict__, indent=1))
    print(summary.table())
    return summary


def _prepare_input(config: DataJobConfig) -> None:
    """The default input is the embedded sample: generate it on first use."""
    from data_jobs.config import DEFAULT_INPUT, DEFAULT_SAMPLE

    if config.input == DEFAULT_INPUT and not storage.exists(DEFAULT_INPUT):
        from data_jobs.sample import generate_sample

        log.info("generating the embedded sample under %s", DEFAULT_SAMPLE)
        generate_sample(DEFAULT_SAMPLE, seed=config.seed)


def _check_iqa_weights(config: DataJobConfig) -> None:
    """Weights named by the config must exist before any task starts."""
    if config.iqa.backend == "hyperiqa":
        storage.require(config.iqa.weights, "iqa.weights")
    if config.faces.backend == "insightface":
        storage.require(config.faces.model_pack, "faces.model_pack")


def _committed(
    layout: Layout, config: DataJobConfig, tasks: list[list[InputItem]], digest: str
) -> dict[int, dict]:
    """Tasks whose commit marker exists for the same inputs; refuses markers of another config."""
    done = {}
    for index, items in enumerate(tasks):
        url = layout.stats_url(task_name(config, index))
        if not storage.exists(url):
            continue
        stats = json.loads(storage.read_text(url))
        if stats["config_hash"] != digest:
            raise ConfigError(
                f"{config.output} holds shards made with config hash {stats['config_hash']}, this config is "
                f"{digest}: write to a new output (or delete that one) instead of mixing preprocessing"
            )
        if stats["inputs"] == [item.video for item in items]:
            done[index] = stats
    return done


def _run_on_ray(
    ray, config: DataJobConfig, tasks: list[list[InputItem]], pending: list[int], digest: str
) -> None:
    from tqdm import tqdm

    remote = ray.remote(process_task).options(num_cpus=config.execution.num_cpus_per_task)
    concurrency = config.execution.concurrency or max(
        1, int(ray.cluster_resources().get("CPU", 1) / config.execution.num_cpus_per_task)
    )
    config_ref = ray.put(config)
    queue, running = list(pending), []
    with tqdm(
        total=len(pending), desc="data tasks", unit="task", disable=not config.execution.progress
    ) as bar:
        while queue or running:
            while queue and len(running) < concurrency:
                index = queue.pop(0)
                running.append(remote.remote(index, tasks[index], config_ref, digest))
            finished, running = ray.wait(running, num_returns=1)
            stats = ray.get(finished[0])
            bar.set_postfix(samples=len(stats["samples"]), rejects=len(stats["rejects"]))
            bar.update(1)


def _remove_stale(layout: Layout, config: DataJobConfig, stats: list[dict], task_count: int) -> None:
    """Drop shards no commit marker lists (from killed or re-planned tasks) and markers of tasks
    that no longer exist, plus temporary files a killed writer left behind."""
    listed = {shard["name"] for task in stats for shard in task["shards"]}
    for url in storage.glob(storage.join(layout.shards, "*.tar")):
        if os.path.basename(url)[: -len(".tar")] not in listed:
            storage.remove(url)
    names = {task_name(config, i) for i in range(task_count)}
    for url in storage.glob(storage.join(layout.stats, "*.json")):
        if os.path.basename(url)[: -len(".json")] not in names:
            storage.remove(url)
    if storage.is_local(layout.root):
        for folder in (layout.shards, layout.stats, layout.root):
            path = storage.filesystem(folder)[1]
            for leftover in os.listdir(path) if os.path.isdir(path) else []:
                if leftover.startswith(".") and ".tmp-" in leftover:
                    os.remove(os.path.join(path, leftover))
