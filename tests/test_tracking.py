"""MLflow: runs logged to a real SQLite store and read back; credentials never become params."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest

from lipforcing.config import config_hash, load_config
from pipelines import tracking
from tests.conftest import free_port, wait_for_port


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


def test_the_experiment_is_filed_as_model_training(local_store):
    """MLflow 3 files an experiment without a kind under GenAI; ours is created as model training,
    and one created before that gets the kind on its next run."""
    experiment_id = tracking.setup_tracking(local_store)
    assert mlflow.get_experiment(experiment_id).tags[tracking.KIND_TAG] == "custom_model_development"
    older = mlflow.create_experiment("older")
    assert tracking.KIND_TAG not in mlflow.get_experiment(older).tags
    assert tracking.setup_tracking(local_store, "older") == older
    assert mlflow.get_experiment(older).tags[tracking.KIND_TAG] == "custom_model_development"


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


def _mlflow_server(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--default-artifact-root", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    wait_for_port(port, timeout=90)
    return server


@pytest.mark.integration
def test_training_metrics_outlive_a_tracking_server_outage(tmp_path, monkeypatch):
    """A real `mlflow server` goes down mid-run: logging neither raises nor blocks, the metrics wait
    in the queue, and once the server is back (same port, same store) they all land, in order."""
    for variable in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)  # the logger sets them for its process: undone after
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    sink = tracking.ResilientLogger(run_id, uri, backoff_s=0.2, max_backoff_s=1.0)
    sink.log_metrics({"loss": 1.0}, step=1)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "clip.mp4").write_bytes(b"video")
    for step in (2, 3):
        sink.log_metrics({"loss": float(step)}, step=step)  # must return, not raise
    sink.log_artifacts(str(tmp_path / "samples"))
    assert sink.pending() and sink.failures >= 1
    server = _mlflow_server(tmp_path, port)
    try:
        assert sink.flush(timeout_s=60)
        history = client.get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 2.0), (3, 3.0)]
        assert [a.path for a in client.list_artifacts(run_id)] == ["clip.mp4"]
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def test_an_unfinished_run_is_resumed_by_its_key(local_store):
    with pytest.raises(RuntimeError), tracking.start_run("dmd", root=local_store, resume_key="s3://b/ray/x-dmd") as first:
        raise RuntimeError("the job died")  # the run ends FAILED
    with tracking.start_run("dmd", root=local_store, resume_key="s3://b/ray/x-dmd") as again:
        assert again.info.run_id == first.info.run_id
    with tracking.start_run("dmd", root=local_store, resume_key="s3://b/ray/x-dmd") as third:
        assert third.info.run_id != first.info.run_id  # the previous one finished: a new run
    assert mlflow.get_run(first.info.run_id).data.tags["resumed"] == "true"
