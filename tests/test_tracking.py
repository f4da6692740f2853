"""MLflow: runs logged to a real SQLite store and read back; credentials never become params."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlflow
import pytest

from lipforcing.config import config_hash, load_config
from pipelines import tracking


@dataclass
class Storage:
    url: str = "s3://bucket/x"
    secret_access_key: str = "do-not-log"


@dataclass
class Job:
    steps: int = 3
    storage: Storage = field(default_factory=Storage)


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "outputs"


def test_parent_and_nested_runs_read_back(local_store):
    config = load_config(Job, overrides=["steps=7"])
    with tracking.start_run("distill", config=config, root=local_store) as parent:
        tracking.log_metrics({"loss": 1.5}, step=0)
        with tracking.start_run("teacher", parent_run_id=parent.info.run_id, root=local_store):
            tracking.log_metrics({"loss": 0.5}, step=1)
    assert (local_store / "mlflow.db").is_file()

    runs = mlflow.search_runs(experiment_names=["lipforcing"], output_format="list")
    by_name = {run.info.run_name: run for run in runs}
    assert set(by_name) == {"distill", "teacher"}
    assert by_name["teacher"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert by_name["distill"].data.params["steps"] == "7"
    assert by_name["distill"].data.metrics["loss"] == 1.5
    assert by_name["distill"].data.tags["config_hash"] == config_hash(config)
    artifacts = mlflow.artifacts.list_artifacts(run_id=parent.info.run_id)
    assert "config.yaml" in [a.path for a in artifacts]
    location = mlflow.get_experiment_by_name("lipforcing").artifact_location
    assert location == (local_store / "mlartifacts").resolve().as_uri()  # beside the database, not ./mlruns


def test_credentials_are_not_logged(local_store):
    with tracking.start_run("data", config=Job(), root=local_store) as run:
        pass
    params = mlflow.get_run(run.info.run_id).data.params
    assert params["storage.url"] == "s3://bucket/x"
    assert "storage.secret_access_key" not in params
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert "steps: 3" in text
    assert "do-not-log" not in text


def test_safe_params_flatten_and_filter():
    params = tracking.safe_params({"a": {"b": 1, "api_key": "x"}, "token_path": "y", "c": "z" * 7000})
    assert params == {"a.b": "1", "c": "z" * 6000}
