"""The data job: raw videos -> aligned WebDataset shards on Ray Data, resumable and incremental.

Plan. The inputs no commit marker covers yet are sorted and cut into tasks of
`write.inputs_per_task`; a task is named by a hash of its inputs (`<shard_name>-<12 hex>`), so
adding files to the input never renames, reruns or reshuffles a finished task: a rerun processes
only the new files. A task writes its shards (`shards/<task>-<part:02d>.tar`; inputs of held-out
identities into `heldout/shards/`), then last `stats/<task>.json`, its commit marker
(video2dataset's incremental mode). A killed run therefore resumes without duplicates or gaps: the
same uncommitted inputs form the same tasks, which rewrite the same shard names with the same keys.

Run. Tasks are rows of a Ray Dataset mapped by `IngestWorker` actors: long-lived workers that
load the face and IQA models once (`execution.ingest_num_gpus` GPUs each) and take one task at a
time, with Ray Data's streaming execution and backpressure. Nothing one input or task does can
sink the job: a stage exception is a reject row (`pipeline.run_stages`), network transfers retry
(`storage.retry`), a task that still fails commits a failure marker whose inputs become reject
rows of stage `task` (retried by the next run), and a worker that dies past its retries leaves
tasks without a marker, which the driver marks the same way. The job fails (after writing its
tables) when one failure reason covers more than `execution.max_failure_share` of the inputs;
broken model packs fail before any work, by a smoke test of every configured backend.

Bookkeeping. The driver lists `stats/` once and reads the markers concurrently; the Parquet
tables are rebuilt from them, and shards or markers no kept marker accounts for are removed. The
manifest is the dataset: training reads the shards it lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_jobs.config import HASH_EXCLUDE, DataJobConfig
from data_jobs.ingest import STAGE_ORDER, ingest_inputs
from data_jobs.inputs import InputItem, list_inputs
from data_jobs.manifest import MANIFEST_SCHEMA, REJECTS_SCHEMA, write_table
from data_jobs.writer import ShardInfo, ShardWriter
from lipforcing import storage
from lipforcing.config import ConfigError, config_hash, to_yaml

log = logging.getLogger("lipforcing.data")

SPLITS = ("train", "heldout")
# Reasons that say the machinery failed, not that the input is unfit (those are outcomes).
FAILURE_REASONS = ("error", "failed", "worker_died")


def data_config_hash(config: DataJobConfig) -> str:
    """Hash of what shapes the data (not where it goes or how many workers make it)."""
    return config_hash(config, exclude=HASH_EXCLUDE)


@dataclass
class Layout:
    """Where everything of one output lives. The held-out split is a shard set of its own
    (`<root>/heldout/`, with its own manifest), so training and evaluation each read a folder."""

    root: str

    def set_root(self, split: str = "train") -> str:
        return self.root if split == "train" else storage.join(self.root, split)

    def shards(self, split: str = "train") -> str:
        return storage.join(self.set_root(split), "shards")

    def shard_url(self, name: str, split: str = "train") -> str:
        return storage.join(self.shards(split), f"{name}.tar")

    @property
    def stats(self) -> str:
        return storage.join(self.root, "stats")

    def stats_url(self, task: str) -> str:
        return storage.join(self.stats, f"{task}.json")

    def file(self, name: str) -> str:
        return storage.join(self.root, name)


@dataclass
class Task:
    name: str
    items: list[InputItem]

    def payload(self) -> str:
        return json.dumps({"name": self.name, "items": [dataclasses.asdict(item) for item in self.items]})

    @classmethod
    def from_payload(cls, payload: str) -> Task:
        values = json.loads(payload)
        return cls(values["name"], [InputItem(**item) for item in values["items"]])


def task_name(config: DataJobConfig, videos: list[str]) -> str:
    """A task is named by its inputs: the name of finished work never moves when inputs are added."""
    return f"{config.write.shard_name}-{hashlib.sha1(chr(10).join(videos).encode()).hexdigest()[:12]}"


def plan_tasks(config: DataJobConfig, items: list[InputItem], covered: set[str]) -> list[Task]:
    """Tasks for the inputs no kept marker covers, sorted by URL, `write.inputs_per_task` each.

    After a kill, the committed tasks leave whole chunks out of the sorted list, so the rest
    re-forms the same tasks (and shard names) it had before."""
    pending = [item for item in items if item.video not in covered and not item.problem]
    size = config.write.inputs_per_task
    chunks = [pending[i : i + size] for i in range(0, len(pending), size)]
    return [Task(task_name(config, [item.video for item in chunk]), chunk) for chunk in chunks]


def read_markers(stats_folder: str, names: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """The commit markers under `stats_folder` (those of `names` when given), by task: one listing,
    then concurrent reads."""
    urls = storage.glob(storage.join(stats_folder, "*.json"))
    urls = urls if names is None else [url for url in urls if _name(url) in names]
    return {_name(url): json.loads(data) for url, data in zip(urls, storage.read_many(urls))}


def kept_markers(markers: dict[str, dict], items: list[InputItem], digest: str, output: str) -> dict[str, dict]:
    """The finished tasks to keep: same config hash (another one is refused), not failed, every
    input still listed, no input claimed twice."""
    listed = {item.video for item in items if not item.problem}
    kept, claimed = {}, set()
    for name, stats in sorted(markers.items()):
        if stats["config_hash"] != digest:
            raise ConfigError(
                f"{output} holds shards made with config hash {stats['config_hash']}, this config is "
                f"{digest}: write to a new output (or delete that one) instead of mixing preprocessing"
            )
        inputs = set(stats["inputs"])
        if stats.get("failed") or not inputs <= listed or inputs & claimed:
            continue
        kept[name] = stats
        claimed |= inputs
    return kept


def commit_task(stats_url: str, shards: list[ShardInfo], samples: list[dict], rejects: list[dict], /, **fields: Any) -> dict[str, Any]:
    """Write a task's stats, its commit marker: what it wrote (shards and their keys, manifest and
    reject rows) plus `fields`. Written last, so a task without one is not done."""
    stats = {
        **fields,
        "shards": [{"name": s.name, "split": s.split, "samples": s.samples, "bytes": s.bytes, "keys": s.keys} for s in shards],
        "samples": samples,
        "rejects": rejects,
        "clip_seconds_out": sum(row["num_frames"] / row["fps"] for row in samples),
    }
    storage.write_text(stats_url, json.dumps(stats, indent=1))
    return stats


def commit_failure(stats_url: str, task: str, sources: list[dict[str, str]], reason: str, error: str, /, **fields: Any) -> dict[str, Any]:
    """A task that could not finish: its inputs become reject rows of stage `task`, and the marker
    says `failed`, so the next run tries them again."""
    rejects = [
        {"source": s["source"], "dataset": s["dataset"], "stage": "task", "reason": reason,
         "detail": error[:500], "start_s": None, "end_s": None}
        for s in sources
    ]  # fmt: skip
    fields = {"task": task, "failed": True, "timings_s": {}, "clip_seconds_in": 0.0, **fields}
    return commit_task(stats_url, [], [], rejects, **fields)


class SplitWriters:
    """One shard writer per split for a task; held-out shards carry `-heldout` in their names so
    every shard name is unique across the output."""

    def __init__(self, layout: Layout, task: str, config: DataJobConfig):
        self.layout, self.task, self.config = layout, task, config
        self.writers: dict[str, ShardWriter] = {}

    def add(self, split: str, key: str, members: dict[str, bytes]) -> str:
        if split not in self.writers:
            prefix = self.task if split == "train" else f"{self.task}-{split}"
            self.writers[split] = ShardWriter(self.layout.shards(split), prefix, self.config.write, split)
        return self.writers[split].add(key, members)

    def close(self) -> list[ShardInfo]:
        return [shard for writer in self.writers.values() for shard in writer.close()]

    @property
    def upload_s(self) -> float:
        return sum(writer.upload_s for writer in self.writers.values())


def guarded(stats_url: str, task: str, sources: list[dict[str, str]], attempts: int, work: Callable[[], dict], **fields: Any) -> dict[str, Any]:
    """Run a task's `work` (which commits its marker) up to `attempts` times; if it still fails,
    commit a failure marker instead. Work that another attempt cannot change (a bad input) never
    raises here: stages turn it into reject rows."""
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except Exception as err:  # an upload that kept failing, a full disk, a bug: this task only
            error = f"attempt {attempt}/{attempts}: {type(err).__name__}: {err}"
            log.warning("task %s failed: %s", task, error)
    return commit_failure(stats_url, task, sources, "failed", error, **fields)


def progress_row(stats: dict[str, Any]) -> dict[str, Any]:
    """What a worker hands back for the progress bar (the marker itself stays in storage)."""
    reasons = Counter(f"{row['stage']}/{row['reason']}" for row in stats["rejects"])
    return {"task": stats["task"], "samples": len(stats["samples"]), "reasons": json.dumps(reasons)}


class IngestWorker:
    """A long-lived ingest actor: models load once, then one task per call."""

    def __init__(self, config: DataJobConfig, digest: str):
        self.config, self.digest, self.layout = config, digest, Layout(config.output)
        self.device = worker_device(config.execution.ingest_num_gpus)
        smoke_test_backends(config, self.device)  # loads and caches the models in this process

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [progress_row(self.run(Task.from_payload(payload))) for payload in batch["task"]]
        return {key: [row[key] for row in rows] for key in ("task", "samples", "reasons")}

    def run(self, task: Task) -> dict[str, Any]:
        url, done = self.layout.stats_url(task.name), {}
        if read_if_present(url, done) and not done[task.name].get("failed"):  # a retried block's finished task
            return done[task.name]
        sources = [{"source": item.video, "dataset": item.dataset} for item in task.items]
        fields = {"config_hash": self.digest, "inputs": [item.video for item in task.items]}
        return guarded(url, task.name, sources, self.config.execution.task_attempts, lambda: self.ingest(task, url), **fields)

    def ingest(self, task: Task, stats_url: str) -> dict[str, Any]:
        started = time.perf_counter()
        writers = SplitWriters(self.layout, task.name, self.config)
        result = ingest_inputs(task.items, self.config, self.digest, lambda item, key, members: writers.add(item.split, key, members), self.device)
        shards = writers.close()
        fields = {"task": task.name, "config_hash": self.digest, "inputs": [item.video for item in task.items],
                  "clip_seconds_in": result.clip_seconds_in, "timings_s": {**result.timings_s, "upload": writers.upload_s},
                  "wall_s": time.perf_counter() - started, "node": node_name()}  # fmt: skip
        return commit_task(stats_url, shards, result.samples, result.rejects, **fields)


def smoke_test_backends(config: DataJobConfig, device: str = "cpu") -> None:
    """Build every configured model backend and run it once on a blank image, so a broken model
    pack stops the job before any work (instead of turning every clip into an `error` reject)."""
    from data_jobs.faces import face_backend
    from data_jobs.iqa import iqa_scorer

    blank = np.full((config.align.size, config.align.size, 3), 127, np.uint8)
    checks = (
        ("faces.model_pack" if config.faces.backend == "insightface" else "faces.backend",
         lambda: face_backend(config.faces.backend, config.faces.model_pack, device).detect(blank)),
        ("iqa.weights" if config.iqa.backend == "hyperiqa" else "iqa.backend",
         lambda: iqa_scorer(config.iqa.backend, config.iqa.weights, device)(blank)),
    )  # fmt: skip
    for key, check in checks:
        try:
            check()
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"config key '{key}': the backend does not load or run: {type(err).__name__}: {err}") from err


def run_until_committed(
    worker: type, payloads: dict[str, str], args: tuple, config: DataJobConfig, num_gpus: float, desc: str, stats: str
) -> dict[str, dict[str, Any]]:
    """Run tasks (name -> payload) through `worker` actors until each has committed its marker under
    `stats`, in at most `execution.task_attempts` rounds: a block whose actor died (a lost node, a
    decoder crash) past its retries is given up by Ray Data, and the next round runs it again on
    whatever nodes are left. Returns the markers found; the caller marks the rest failed."""
    found: dict[str, dict[str, Any]] = {}
    for attempt in range(config.execution.task_attempts):
        missing = [name for name in payloads if name not in found]
        if not missing:
            break
        if attempt:
            log.warning("%s: %d tasks lost their worker; running them again", desc, len(missing))
        map_tasks(worker, [payloads[name] for name in missing], args, config, num_gpus, desc)
        found.update(read_markers(stats, set(missing)))
        for name in set(missing) - set(found):  # a listing can lag a write
            read_if_present(storage.join(stats, f"{name}.json"), found)
    return found


def map_tasks(
    worker: type, payloads: list[str], args: tuple, config: DataJobConfig, num_gpus: float, desc: str
) -> list[dict[str, Any]]:
    """One Ray Data pass of tasks through `worker` actors; returns the workers' progress rows. A
    block whose actor keeps dying is given up (`max_errored_blocks`), not the job."""
    import ray
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = -1
    context.enable_progress_bars = False
    execution = config.execution
    concurrency = execution.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1) / execution.num_cpus_per_task))
    if num_gpus > 0:
        concurrency = max(1, min(concurrency, int(ray.cluster_resources().get("GPU", 0) / num_gpus)))
    dataset = ray.data.from_items([{"task": p} for p in payloads], override_num_blocks=min(len(payloads), 10_000))
    # One task in flight per actor: tasks are long, so a free actor should take the next one.
    pool = ray.data.ActorPoolStrategy(size=min(concurrency, len(payloads)), max_tasks_in_flight_per_actor=1)
    with warnings.catch_warnings():  # retry bounds have no named parameter yet in Ray 2.60
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", category=DeprecationWarning)
        mapped = dataset.map_batches(
            worker, fn_constructor_args=args, batch_size=1, compute=pool,
            num_cpus=execution.num_cpus_per_task, num_gpus=num_gpus or None,
            max_restarts=-1, max_task_retries=execution.task_attempts - 1,
        )  # fmt: skip
    rows, reasons = [], Counter()
    with tqdm(total=len(payloads), desc=desc, unit="task", disable=not execution.progress) as bar:
        for row in mapped.iter_rows():
            rows.append(row)
            reasons.update(json.loads(row["reasons"]))
            bar.set_postfix_str(", ".join(f"{reason} {count}" for reason, count in reasons.most_common(4)))
            bar.update(1)
    return rows


@dataclass
class JobSummary:
    inputs: int = 0
    inputs_rejected: int = 0
    segments: int = 0
    written: int = 0
    heldout: int = 0
    segments_rejected: int = 0
    shots_dropped: int = 0
    shards: int = 0
    clip_seconds_in: float = 0.0
    clip_seconds_out: float = 0.0
    wall_s: float = 0.0
    tasks_run: int = 0
    tasks_skipped: int = 0
    tasks_failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    failure: str = ""  # set when one failure reason covers too many inputs: the job exits non-zero

    def table(self) -> str:
        lines = ["| count | value |", "|---|---:|"]
        for name in ("inputs", "inputs_rejected", "segments", "written", "heldout", "segments_rejected",
                     "shots_dropped", "shards", "tasks_run", "tasks_skipped", "tasks_failed"):  # fmt: skip
            lines.append(f"| {name} | {getattr(self, name)} |")
        lines.append(f"| clip seconds in / out | {self.clip_seconds_in:.1f} / {self.clip_seconds_out:.1f} |")
        lines.append(f"| wall seconds | {self.wall_s:.1f} |")
        lines += ["", "| stage/reason | rejected |", "|---|---:|"]
        lines += [f"| {reason} | {count} |" for reason, count in sorted(self.reasons.items())]
        lines += ["", "| stage | worker seconds |", "|---|---:|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in self.timings_s.items()]
        if self.failure:
            lines += ["", f"FAILED: {self.failure}"]
        return "\n".join(lines)


def summarize(stats: list[dict[str, Any]], listing_rejects: list[dict], wall_s: float, tasks_run: int) -> JobSummary:
    summary = JobSummary(wall_s=wall_s, tasks_run=tasks_run, tasks_skipped=len(stats) - tasks_run)
    reasons: Counter[str] = Counter()
    timings: Counter[str] = Counter()
    summary.inputs = len(listing_rejects)
    for row in listing_rejects:
        reasons[f"{row['stage']}/{row['reason']}"] += 1
    summary.inputs_rejected = len(listing_rejects)
    for task in stats:
        summary.inputs += len(task["inputs"])
        summary.tasks_failed += bool(task.get("failed"))
        summary.written += len(task["samples"])
        summary.heldout += sum(row.get("split") == "heldout" for row in task["samples"])
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


def failure_check(summary: JobSummary, max_share: float) -> str:
    """'' or why the job failed: the most common failure reason (an exception, a failed task, a dead
    worker; not an unfit input) covers more than `max_share` of the inputs."""
    failures = {reason: count for reason, count in summary.reasons.items() if reason.split("/")[1] in FAILURE_REASONS}
    if not failures or summary.inputs == 0:
        return ""
    reason, count = max(failures.items(), key=lambda pair: pair[1])
    if count <= max_share * summary.inputs:
        return ""
    return (f"{count} of {summary.inputs} inputs failed with {reason} (more than execution.max_failure_share="
            f"{max_share}); see rejects.parquet for the errors")  # fmt: skip


def require_ray() -> None:
    """The data job's passes run on a Ray the caller started (`pipelines.ray_cluster.init_ray`)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("the data job runs its tasks on Ray: start or join one first (pipelines.ray_cluster.init_ray)")


def listing_reject_rows(items: list[InputItem]) -> list[dict[str, Any]]:
    """Inputs the listing already refused (duplicate rows, unsupported extensions), as reject rows."""
    rows = []
    for item in items:
        if item.problem:
            reason, _, detail = item.problem.partition(":")
            rows.append({"source": item.video, "dataset": item.dataset, "stage": "input", "reason": reason.strip(),
                         "detail": detail.strip() or reason, "start_s": None, "end_s": None})  # fmt: skip
    return rows


def plan_ingest(config: DataJobConfig, items: list[InputItem] | None = None) -> tuple[list[InputItem], dict[str, dict], dict[str, dict], list[Task]]:
    """(inputs listed, markers found, markers kept, tasks still to run) of the ingest at `config.output`:
    what a run would do, read from the listing (`items`, else `config.input`'s) and the commit markers
    without processing anything."""
    items = list_inputs(config.input, config.split) if items is None else items
    markers = read_markers(Layout(config.output).stats)
    kept = kept_markers(markers, items, data_config_hash(config), config.output)
    return items, markers, kept, plan_tasks(config, items, {video for stats in kept.values() for video in stats["inputs"]})


def run_data_job(config: DataJobConfig) -> JobSummary:
    """Plan, run the pending tasks on Ray (already initialised), rebuild the tables, report."""
    started = time.perf_counter()
    digest = data_config_hash(config)
    layout = Layout(config.output)
    prepare_input(config)
    _check_weights(config)
    items, markers, kept, tasks = plan_ingest(config)
    storage.write_text(layout.file("config.yaml"), to_yaml(config))
    log.info("data job %s: %d tasks committed, %d to run", digest, len(kept), len(tasks))
    if tasks:
        smoke_test_backends(config)
        require_ray()
    payloads = {task.name: task.payload() for task in tasks}
    fresh = run_until_committed(IngestWorker, payloads, (config, digest), config, config.execution.ingest_num_gpus, "ingest", layout.stats) if tasks else {}
    for task in tasks:
        if task.name not in fresh:  # its worker died in every round
            sources = [{"source": item.video, "dataset": item.dataset} for item in task.items]
            fresh[task.name] = commit_failure(layout.stats_url(task.name), task.name, sources, "worker_died",
                                              "the worker running this task died on every attempt",
                                              config_hash=digest, inputs=[i.video for i in task.items])  # fmt: skip
    stats = {**kept, **fresh}
    remove_stale(layout, stats, markers)
    return finalize(layout, list(stats.values()), listing_reject_rows(items), time.perf_counter() - started, len(tasks),
                    config.execution.max_failure_share)  # fmt: skip


def finalize(layout: Layout, stats: list[dict[str, Any]], listing_rejects: list[dict], wall_s: float, tasks_run: int,
             max_failure_share: float) -> JobSummary:  # fmt: skip
    """Rebuild the Parquet tables (one manifest per shard set) and the summary, with its failure
    verdict, from the markers."""
    rows = [row for task in sorted(stats, key=lambda s: s["task"]) for row in task["samples"]]
    for split in SPLITS:
        chosen = [row for row in rows if row.get("split", "train") == split]
        if split == "train" or chosen:
            write_table(chosen, MANIFEST_SCHEMA, storage.join(layout.set_root(split), "manifest.parquet"), ["key"])
    rejects = listing_rejects + [row for task in stats for row in task["rejects"]]
    write_table(rejects, REJECTS_SCHEMA, layout.file("rejects.parquet"), ["source", "stage", "start_s"])
    summary = summarize(stats, listing_rejects, wall_s, tasks_run)
    summary.failure = failure_check(summary, max_failure_share)
    storage.write_text(layout.file("summary.json"), json.dumps(summary.__dict__, indent=1))
    print(summary.table())
    return summary


def remove_stale(layout: Layout, stats: dict[str, dict], markers: dict[str, dict]) -> None:
    """Drop markers not kept (superseded, failed and retried, inputs gone) and shards no kept
    marker lists (from killed or re-planned tasks), plus temporary files a killed writer left."""
    stale = [layout.stats_url(name) for name in set(markers) - set(stats)]
    for split in SPLITS:
        listed = {shard["name"] for task in stats.values() for shard in task["shards"] if shard.get("split", "train") == split}
        stale += [url for url in storage.glob(storage.join(layout.shards(split), "*.tar")) if _name(url) not in listed]
    for url in stale:
        try:
            storage.remove(url)
        except Exception as err:  # not ours to delete (a folder, no permission): the manifest ignores it anyway
            log.warning("left %s in place: %s: %s", url, type(err).__name__, err)
    if storage.is_local(layout.root):
        folders = [layout.stats, layout.root] + [layout.shards(split) for split in SPLITS]
        for folder in folders:
            path = storage.filesystem(folder)[1]
            for leftover in os.listdir(path) if os.path.isdir(path) else []:
                if leftover.startswith(".") and ".tmp-" in leftover:
                    os.remove(os.path.join(path, leftover))


def prepare_input(config: DataJobConfig) -> None:
    """The default input is the embedded sample: generate it on first use."""
    from data_jobs.config import DEFAULT_INPUT, DEFAULT_SAMPLE

    if config.input == DEFAULT_INPUT and not storage.exists(DEFAULT_INPUT):
        from data_jobs.sample import generate_sample

        log.info("generating the embedded sample under %s", DEFAULT_SAMPLE)
        generate_sample(DEFAULT_SAMPLE, seed=config.seed)


def _check_weights(config: DataJobConfig) -> None:
    """Weights named by the config must exist before any task starts."""
    if config.iqa.backend == "hyperiqa":
        storage.require(config.iqa.weights, "iqa.weights")
    if config.faces.backend == "insightface":
        storage.require(config.faces.model_pack, "faces.model_pack")


def read_if_present(url: str, found: dict[str, dict]) -> bool:
    """Read a marker the listing missed (a listing can lag a write); never mark done work failed."""
    try:
        found[_name(url)] = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return False
    return True


def worker_device(num_gpus: float) -> str:
    """Where a worker's models run: the GPU Ray gave it, else the CPU (without importing torch,
    which a CPU ingest worker never needs)."""
    if num_gpus <= 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _name(url: str) -> str:
    """A marker's or shard's name: its file name without the extension."""
    return os.path.basename(url).rsplit(".", 1)[0]


def node_name() -> str:
    import socket

    return socket.gethostname()
