"""Lineage in MLflow: the data run logs the datasets it wrote, a training run the dataset it read and
the models it used, a registered student its data's lineage; `lineage.chain` walks back from the
student to the raw input. Real MLflow (a SQLite store per test) on the session's real data-job output."""

from __future__ import annotations

import hashlib
import json
import os

import mlflow
import pandas as pd
import pytest

from data_jobs.config import DataJobConfig
from data_jobs.job import data_config_hash
from lipforcing import storage
from pipelines import lineage, tracking
from pipelines.data import log_data_run
from pipelines.distill import log_lineage, register_student
from pipelines.distill_config import DistillConfig
from pipelines.jobs import resolve_config
from pipelines.syncnet_model import log_syncnet

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store, so the session's registry and aliases stay as they are."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def manifest_facts(data: str) -> tuple[str, int]:
    """(sha256 of the manifest file, its rows), read independently of the code under test."""
    raw = storage.read_bytes(storage.join(data, "manifest.parquet"))
    return hashlib.sha256(raw).hexdigest(), len(pd.read_parquet(storage.join(data, "manifest.parquet")))


def inputs_by_context(run_id: str) -> dict[str, tuple]:
    run = mlflow.tracking.MlflowClient().get_run(run_id)
    found = {}
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        found[tags["mlflow.data.context"]] = (item.dataset, tags)
    return found


def data_run(sample_list: str, sample_job) -> tuple[DataJobConfig, str]:
    """The data run the job logs for the session's sample output (the job itself ran in the fixture)."""
    output, summary = sample_job
    config = resolve_config(DataJobConfig, ["profile=tiny", f"input={sample_list}", f"output={output}", "score.enabled=false"])
    log_data_run(config, summary)
    [run] = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], filter_string="tags.job = 'data'", output_format="list")
    return config, run.info.run_id


def test_the_data_run_logs_the_shard_sets_it_wrote(store, sample_list, sample_job):
    output = sample_job[0]
    _, run_id = data_run(sample_list, sample_job)
    found = inputs_by_context(run_id)
    assert set(found) == {"output", "heldout"}  # the sample holds one identity out
    for context, folder in (("output", output), ("heldout", storage.join(output, "heldout"))):
        dataset, tags = found[context]
        sha, rows = manifest_facts(folder)
        assert dataset.digest == sha[:32] and tags["manifest_sha256"] == sha
        assert int(tags["samples"]) == rows > 0
        assert json.loads(dataset.source)["uri"].rstrip("/").endswith(folder.rstrip("/").split("/")[-1])
    assert found["output"][1]["data_config_hash"] == found["heldout"][1]["data_config_hash"]  # one job shaped both


def test_a_student_traces_back_to_the_raw_input(store, sample_list, sample_job):
    data_config, data_run_id = data_run(sample_list, sample_job)
    output = sample_job[0]
    config = resolve_config(DistillConfig, ["profile=tiny", f"data={output}", "dmd.syncnet=", "dmd.registered_alias=candidate"])
    with tracking.start_run("distill", config=config, tags={"job": "distill"}) as parent:
        trained_on = log_lineage(config)
        with tracking.start_run("dmd", parent_run_id=parent.info.run_id, tags={"stage": "dmd"}):
            pass
        register_student(config, parent.info.run_id, trained_on)

    sha, rows = manifest_facts(output)
    links = {link["link"]: link for link in lineage.chain("models:/lipforcing-student@candidate")}
    assert list(links) == ["model version", "training run", "dataset", "data run"]
    assert links["training run"]["run_id"] == parent.info.run_id
    assert links["dataset"]["digest"] == sha[:32] and int(links["dataset"]["samples"]) == rows
    assert links["data run"]["run_id"] == data_run_id
    assert links["data run"]["data_config_hash"] == data_config_hash(data_config)
    assert links["data run"]["input"] == sample_list
    version = mlflow.tracking.MlflowClient().get_model_version_by_alias("lipforcing-student", "candidate")
    assert version.tags["lineage.manifest_sha256"] == sha  # the version itself says what it learned from


def test_a_registered_upstream_model_is_pinned_to_the_version_used(store, sample_job, tmp_path):
    """`models:/syncnet@champion` moves; the run records the version the alias pointed at when it ran."""
    weights = tmp_path / "syncnet.pt"
    weights.write_bytes(b"planted")
    with tracking.start_run("syncnet", tags={"job": "syncnet"}) as run:
        mlflow.log_artifact(str(weights))
    for _ in range(2):  # versions 1 and 2; the alias ends on 2
        log_syncnet(run.info.run_id, "syncnet.pt", "syncnet", {}, alias="champion")
    config = resolve_config(DistillConfig, ["profile=tiny", f"data={sample_job[0]}"])  # dmd.syncnet defaults to the champion
    with tracking.start_run("distill", config=config, tags={"job": "distill"}) as parent:
        tags = log_lineage(config)
    assert tags["upstream.syncnet"] == "models:/syncnet@champion" and tags["upstream.syncnet.version"] == "syncnet/2"
    recorded = mlflow.tracking.MlflowClient().get_run(parent.info.run_id).data.tags
    assert recorded["upstream.syncnet.version"] == "syncnet/2"
    # the teacher is trained here: the run names where its weights land, for a later fine-tune to reuse
    assert recorded["upstream.teacher"] == os.path.join(os.path.abspath(config.output), "teacher", "dit.safetensors")
    assert "upstream.teacher.version" not in recorded
    # The job goes on with the version it recorded: a later move of the alias changes neither.
    assert config.dmd.syncnet == "models:/syncnet/2"
