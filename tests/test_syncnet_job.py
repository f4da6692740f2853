"""`make syncnet` on the sample shards: it learns, validates offsets, registers, and resumes."""

from __future__ import annotations

import os

import mlflow
import pytest

from lipforcing import storage
from pipelines.jobs import resolve_config
from pipelines.syncnet import SyncNetJobConfig
from pipelines.syncnet import main as train_syncnet

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def query_the_session_store(mlflow_store):
    """Read runs from the store the jobs wrote to (another test may have pointed MLflow elsewhere)."""
    mlflow.set_tracking_uri(mlflow_store)


def history(run_id: str, key: str) -> list:
    return sorted(mlflow.tracking.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)


def syncnet_runs() -> list:
    return mlflow.search_runs(
        experiment_names=["lipforcing"], filter_string="tags.job = 'syncnet'", order_by=["start_time ASC"], output_format="list"
    )


def test_syncnet_job_trains_registers_and_recovers_offsets(trained_syncnet):
    run = syncnet_runs()[0]
    losses = [m.value for m in history(run.info.run_id, "loss")]
    assert len(losses) == 40
    assert sum(losses[-5:]) < sum(losses[:5])
    assert run.data.metrics["offset_recovery_rate"] >= 0.6
    assert 0.0 <= run.data.metrics["val_accuracy"] <= 1.0
    assert storage.exists(trained_syncnet)
    assert "train:" in storage.read_text(storage.join(os.path.dirname(trained_syncnet), "config.yaml"))
    version = mlflow.tracking.MlflowClient().get_model_version_by_alias("syncnet", "champion")
    assert version.run_id == run.info.run_id


def test_rerun_resumes_from_the_last_checkpoint(trained_syncnet, sample_shards):
    output = trained_syncnet.rsplit("/", 1)[0]
    config = resolve_config(
        SyncNetJobConfig, [f"data={sample_shards}", f"output={output}", "train.steps=46", "train.checkpoint_every=20"]
    )
    assert train_syncnet(config) == 0
    resumed = syncnet_runs()[-1]
    steps = [m.step for m in history(resumed.info.run_id, "loss")]
    assert steps == list(range(41, 47))  # continued after iteration 40 instead of starting over
