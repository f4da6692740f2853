"""`make data` / `python -m pipelines.data input=... output=...`: raw videos -> final shards.

Ingest (probe .. align, IQA) writes <output>/aligned; the SyncNet score pass writes the final
<output>/shards, manifest and rejects (`score.enabled=false` writes ingest output there directly).
The passes live in `data_jobs/`; this module runs them on Ray, picks the SyncNet the score pass uses
(a registered model trained on this data, a path, or one trained on the aligned shards first: see
`pipelines/syncnet_choice.py`) and logs the run, with that choice, to MLflow.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from data_jobs.config import DataJobConfig, validate
from data_jobs.job import SPLITS, JobSummary, data_config_hash, run_data_job
from data_jobs.score import run_score_pass, score_plan
from lipforcing import storage
from pipelines import lineage, syncnet_choice, tracking
from pipelines.jobs import run_job
from pipelines.ray_cluster import init_ray


def run_data(config: DataJobConfig) -> JobSummary:
    """Ingest, then (when enabled) score with a SyncNet resolved or trained here."""
    init_ray(num_cpus=config.execution.local_num_cpus or None)
    if not config.score.enabled:
        return run_data_job(config)
    started = time.perf_counter()
    ingest = run_data_job(ingest_config(config))
    if ingest.failure:  # the machinery is broken: scoring its leftovers would hide that
        return ingest
    plan = score_plan(config)
    *_, pending = plan
    weights = syncnet_for_scoring(config, ingest_config(config).output) if pending else ""
    return run_score_pass(config, weights, started, plan)


def ingest_config(config: DataJobConfig) -> DataJobConfig:
    """The ingest pass's config: with scoring on it writes `<output>/aligned`, else the final output."""
    return dataclasses.replace(config, output=storage.join(config.output, "aligned")) if config.score.enabled else config


def syncnet_for_scoring(config: DataJobConfig, aligned: str) -> str:
    """The SyncNet file to score with, chosen and logged by `pipelines.syncnet_choice` (the configured
    one unless it was trained on other data, else one trained here) and recorded beside the shards."""
    choice = syncnet_choice.choose_syncnet(config, aligned)
    syncnet_choice.write_choice(config.output, choice)
    return choice.weights


def log_produced(output: str) -> None:
    """The shard sets this job wrote, as the data run's datasets ("output"; "heldout" when any
    identity was held out), so a model trained on them can be traced back to this run."""
    for split in SPLITS:
        produced = lineage.data_lineage(output, split)
        if split == "train" or produced.manifest_sha256:
            lineage.log_dataset(produced, "output" if split == "train" else split)


def main(config: DataJobConfig) -> int:
    summary = run_data(config)
    log_data_run(config, summary)
    return report_failure(summary)


def report_failure(summary: JobSummary) -> int:
    """The job's exit status, with the failure said on stderr."""
    if summary.failure:
        print(f"data job failed: {summary.failure}", file=sys.stderr)
        return 1
    return 0


def log_data_run(config: DataJobConfig, summary: JobSummary) -> str:
    """The data run in MLflow: config, the SyncNet choice, the summary's counts and the datasets
    written; returns its run id."""
    syncnet_tags, syncnet_params = syncnet_choice.for_data_run(config.output) if config.score.enabled else ({}, {})
    tags = {"job": "data", "data_config_hash": data_config_hash(config), **syncnet_tags}
    with tracking.start_run("data", config=config, tags=tags) as run:
        tracking.mlflow.log_params(syncnet_params)
        log_produced(config.output)
        metrics = {k: v for k, v in summary.__dict__.items() if isinstance(v, int | float)}
        metrics.update({f"rejected.{k.replace('/', '.')}": v for k, v in summary.reasons.items()})
        metrics.update({f"stage_s.{k}": v for k, v in summary.timings_s.items()})
        tracking.log_metrics(metrics)
    return run.info.run_id


if __name__ == "__main__":
    sys.exit(run_job("pipelines.data", DataJobConfig, main, validate=validate))
