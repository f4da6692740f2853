"""`make data` / `python -m pipelines.data input=... output=...`: raw videos -> final shards.

Ingest (probe .. align, IQA) writes <output>/aligned; the SyncNet score pass writes the final
<output>/shards, manifest and rejects (`score.enabled=false` writes ingest output there directly).
The job itself lives in `data_jobs/`; this module is its command-line entry point.
"""

from __future__ import annotations

import sys

from data_jobs.config import DataJobConfig
from pipelines.jobs import run_job


def main(config: DataJobConfig) -> int:
    from data_jobs.job import data_config_hash
    from data_jobs.score import run_scored_job
    from pipelines.tracking import log_metrics, start_run

    summary = run_scored_job(config)
    with start_run("data", config=config, tags={"job": "data", "data_config_hash": data_config_hash(config)}):
        metrics = {k: v for k, v in summary.__dict__.items() if isinstance(v, int | float)}
        metrics.update({f"rejected.{k.replace('/', '.')}": v for k, v in summary.reasons.items()})
        metrics.update({f"stage_s.{k}": v for k, v in summary.timings_s.items()})
        log_metrics(metrics)
    return 0


if __name__ == "__main__":
    sys.exit(run_job("pipelines.data", DataJobConfig, main))
