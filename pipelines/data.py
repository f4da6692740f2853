"""`make data` / `python -m pipelines.data input=... output=...`: raw videos -> final shards.

Ingest (probe .. align, IQA) writes <output>/aligned; the SyncNet score pass writes the final
<output>/shards, manifest and rejects (`score.enabled=false` writes ingest output there directly).
The passes live in `data_jobs/`; this module runs them on Ray, picks the SyncNet the score pass uses
(a registered model, a path, or one trained on the aligned shards first) and logs the run to MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

from data_jobs.config import DataJobConfig
from data_jobs.job import JobSummary, data_config_hash, run_data_job
from data_jobs.score import run_score_pass, score_plan
from lipforcing import storage
from lipforcing.config import ConfigError
from pipelines import tracking
from pipelines.jobs import resolve_config, run_job
from pipelines.ray_cluster import init_ray

log = logging.getLogger("lipforcing.data")


def run_data(config: DataJobConfig) -> JobSummary:
    """Ingest, then (when enabled) score with a SyncNet resolved or trained here."""
    init_ray(num_cpus=config.execution.local_num_cpus or None)
    if not config.score.enabled:
        return run_data_job(config)
    started = time.perf_counter()
    aligned = storage.join(config.output, "aligned")
    run_data_job(dataclasses.replace(config, output=aligned))
    _, pending = score_plan(config)
    weights = syncnet_for_scoring(config, aligned) if pending else ""
    return run_score_pass(config, weights, started)


def syncnet_for_scoring(config: DataJobConfig, aligned: str) -> str:
    """The SyncNet file to score with: the configured one, or one trained now on the aligned shards."""
    try:
        return tracking.resolve_model_for_workers(config.score.syncnet, config.output, "score.syncnet")
    except FileNotFoundError as err:
        missing = str(err)
    if not config.score.train_if_missing:
        raise ConfigError(
            f"{missing}: set config key 'score.syncnet' to syncnet_v2.model or a trained SyncNet, "
            "set score.train_if_missing=true to train one on these shards, or score.enabled=false"
        )
    from pipelines.syncnet import SyncNetJobConfig
    from pipelines.syncnet import main as train_syncnet

    output = config.score.syncnet_output or storage.join(config.output, "syncnet")
    log.info("score: %s; training a SyncNet on %s first, into %s", missing, aligned, output)
    syncnet_config = resolve_config(SyncNetJobConfig, [
        f"profile={config.profile}", f"data={aligned}", f"output={output}",
        f"train.steps={config.score.syncnet_steps}", f"seed={config.seed}",
    ])  # fmt: skip
    train_syncnet(syncnet_config)
    return storage.join(output, "syncnet.pt")


def main(config: DataJobConfig) -> int:
    summary = run_data(config)
    with tracking.start_run("data", config=config, tags={"job": "data", "data_config_hash": data_config_hash(config)}):
        metrics = {k: v for k, v in summary.__dict__.items() if isinstance(v, int | float)}
        metrics.update({f"rejected.{k.replace('/', '.')}": v for k, v in summary.reasons.items()})
        metrics.update({f"stage_s.{k}": v for k, v in summary.timings_s.items()})
        tracking.log_metrics(metrics)
    return 0


if __name__ == "__main__":
    sys.exit(run_job("pipelines.data", DataJobConfig, main))
