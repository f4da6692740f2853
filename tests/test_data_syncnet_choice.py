"""Which SyncNet the data job scores with: chosen on the driver by its training data's lineage.

Tiny SyncNets (random weights, saved the way `make syncnet` saves them) are registered in the real
SQLite MLflow store with planted lineage tags; each test registers under its own name, so the
session's `syncnet@champion` stays as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid

import mlflow
import pytest

from data_jobs.config import DataJobConfig
from data_jobs.job import data_config_hash
from data_jobs.manifest import MANIFEST_SCHEMA, write_table
from lipforcing import storage
from lipforcing.config import ConfigError, to_yaml
from lipforcing.models.syncnet import StableSyncNet, SyncNetConfig, load_syncnet, save_syncnet
from pipelines import tracking
from pipelines.data import syncnet_for_scoring
from pipelines.lineage import DataLineage, data_lineage
from pipelines.syncnet_choice import choose_syncnet, for_data_run, same_data
from pipelines.syncnet_model import log_syncnet


@pytest.fixture(autouse=True)
def query_the_session_store(mlflow_store):
    mlflow.set_tracking_uri(mlflow_store)


def data_output(folder, config: DataJobConfig, datasets: list[str]) -> str:
    """A data job's output as the SyncNet job and the score pass read it: config.yaml and a manifest
    with one row per planted dataset tag."""
    url = str(folder)
    storage.write_text(storage.join(url, "config.yaml"), to_yaml(dataclasses.replace(config, output=url)))
    rows = [{"key": f"{name}-{i}", "dataset": name, "num_frames": 125, "fps": 25.0} for i, name in enumerate(datasets)]
    write_table(rows, MANIFEST_SCHEMA, storage.join(url, "manifest.parquet"), ["key"])
    return url


def register_syncnet(folder, tags: dict[str, str], name: str = "") -> str:
    """A tiny SyncNet registered as @champion of `name` (default: a new model) with `tags` on its
    version; returns its URI."""
    name = name or f"syncnet-{uuid.uuid4().hex[:8]}"
    weights = folder / "syncnet.pt"
    save_syncnet(StableSyncNet(SyncNetConfig()), str(weights))
    with tracking.start_run("syncnet-choice-test", tags={"job": "test"}) as run:
        mlflow.log_artifact(str(weights))
    log_syncnet(run.info.run_id, "syncnet.pt", name, tags, alias="champion")
    return f"models:/{name}@champion"


def job(tmp_path, syncnet: str, **score) -> DataJobConfig:
    """The job that scores: its input is the real footage, its aligned shards carry dataset `real`."""
    config = DataJobConfig(input="/data/real/list.csv", output=str(tmp_path / "out"))
    return dataclasses.replace(config, score=dataclasses.replace(config.score, syncnet=syncnet, **score))


def aligned_of(config: DataJobConfig) -> str:
    aligned = storage.join(config.output, "aligned")
    return data_output(aligned, config, ["real", "real"])


def test_a_syncnet_trained_on_this_data_is_used_and_logged(tmp_path, caplog):
    config = job(tmp_path, "")
    aligned = aligned_of(config)
    uri = register_syncnet(tmp_path, data_lineage(aligned).tags())  # trained on these very shards
    config = job(tmp_path, uri)
    caplog.set_level(logging.INFO, logger="lipforcing.data")

    choice = choose_syncnet(config, aligned)

    assert (choice.uri, choice.version) == (uri, "1")
    assert choice.lineage.data_config_hash == data_config_hash(config)
    assert choice.lineage.datasets == ("real",)
    assert "trained on this data" in choice.reason
    load_syncnet(SyncNetConfig(weights=choice.weights))  # the registered file itself
    logged = caplog.text
    assert uri in logged and "version 1" in logged and choice.weights in logged and 'datasets=["real"]' in logged


def test_the_same_datasets_ingested_with_other_settings_count_as_this_data(tmp_path):
    config = job(tmp_path, "")
    other_settings = dataclasses.replace(config, iqa=dataclasses.replace(config.iqa, threshold=10.0))
    trained_on = data_lineage(data_output(tmp_path / "earlier", other_settings, ["real"]))
    assert trained_on.data_config_hash != data_config_hash(config)
    uri = register_syncnet(tmp_path, trained_on.tags())

    choice = choose_syncnet(job(tmp_path, uri), aligned_of(config))

    assert choice.version == "1" and "trained on these datasets ['real']" in choice.reason


def test_a_syncnet_trained_on_other_data_is_refused_unless_allowed(tmp_path):
    """The demo's toy SyncNet (trained on the generated sample) met real footage: refused up front."""
    sample = DataJobConfig(input="outputs/sample/list.csv")
    toy = data_lineage(data_output(tmp_path / "sample", sample, ["hdtf", "voxceleb2", "hallo3"]))
    uri = register_syncnet(tmp_path, toy.tags())
    config = job(tmp_path, uri)
    aligned = aligned_of(config)

    with pytest.raises(ConfigError) as refused:
        syncnet_for_scoring(config, aligned)
    message = str(refused.value)
    assert "'score.syncnet'" in message and "score.allow_foreign_syncnet=true" in message
    assert "['hallo3', 'hdtf', 'voxceleb2']" in message and "['real']" in message
    assert not storage.exists(storage.join(config.output, "syncnet.json"))  # stopped before any scoring

    allowed = job(tmp_path, uri, allow_foreign_syncnet=True)
    weights = syncnet_for_scoring(allowed, aligned)
    recorded = json.loads(storage.read_text(storage.join(allowed.output, "syncnet.json")))
    assert recorded["weights"] == weights and recorded["version"] == "1"
    assert recorded["lineage"] == toy.fields()
    assert "accepted because score.allow_foreign_syncnet=true" in recorded["reason"]


def test_a_version_registered_without_lineage_is_refused(tmp_path):
    """What a registry filled before lineage tags existed holds: nobody knows what it learned from."""
    uri = register_syncnet(tmp_path, {})
    config = job(tmp_path, uri)
    with pytest.raises(ConfigError, match="carries no lineage tags.*'score.syncnet'.*score.allow_foreign_syncnet"):
        choose_syncnet(config, aligned_of(config))


def test_nothing_registered_stops_before_scoring(tmp_path):
    config = job(tmp_path, f"models:/never-registered-{uuid.uuid4().hex[:8]}@champion", train_if_missing=False)
    with pytest.raises(ConfigError) as stopped:
        syncnet_for_scoring(config, aligned_of(config))
    message = str(stopped.value)
    assert "is not in the MLflow registry" in message
    assert "'score.syncnet'" in message and "score.train_if_missing=true" in message
    assert not storage.exists(storage.join(config.output, "syncnet.json"))


def test_a_file_given_by_path_is_a_general_purpose_syncnet(tmp_path):
    weights = str(tmp_path / "syncnet_v2.model")
    save_syncnet(StableSyncNet(SyncNetConfig()), weights)
    config = job(tmp_path, weights)
    choice = choose_syncnet(config, aligned_of(config))
    assert (choice.weights, choice.version, choice.lineage) == (weights, "", None)
    assert "general-purpose" in choice.reason


def test_the_data_run_names_the_syncnet_in_mlflow_and_the_summary(tmp_path):
    config = job(tmp_path, "")
    aligned = aligned_of(config)
    uri = register_syncnet(tmp_path, data_lineage(aligned).tags())
    config = job(tmp_path, uri)
    syncnet_for_scoring(config, aligned)
    storage.write_text(storage.join(config.output, "summary.json"), json.dumps({"written": 2}))

    tags, params = for_data_run(config.output)

    assert tags == {"syncnet.uri": uri, "syncnet.version": "1"}
    assert params["syncnet.lineage.data_config_hash"] == data_config_hash(config)
    assert params["syncnet.lineage.datasets"] == '["real"]'
    summary = json.loads(storage.read_text(storage.join(config.output, "summary.json")))
    assert summary["written"] == 2 and summary["syncnet"]["uri"] == uri
    assert for_data_run(str(tmp_path / "never-scored")) == ({}, {})


def test_the_rule_needs_both_the_config_hash_and_the_dataset_tags_to_differ():
    scored = DataLineage("s3://b/out/aligned", "aaaa", ("hdtf",))
    assert same_data(DataLineage("elsewhere", "aaaa", ("vox",)), scored)[0]
    assert same_data(DataLineage("elsewhere", "bbbb", ("hdtf",)), scored)[0]
    assert not same_data(DataLineage("elsewhere", "bbbb", ("hdtf", "vox")), scored)[0]  # a superset is other data
    assert not same_data(None, scored)[0]
    assert DataLineage.from_tags(scored.tags()) == scored
    assert DataLineage.from_tags({"lineage.data": "somewhere"}) is None  # a location alone says nothing


@pytest.mark.integration
def test_make_syncnet_tags_its_version_with_the_lineage_of_its_data(trained_syncnet, sample_shards):
    [run] = mlflow.search_runs(experiment_names=["lipforcing"], output_format="list",
                               filter_string=f"tags.job = 'syncnet' and params.output = '{os.path.dirname(trained_syncnet)}'")  # fmt: skip
    [version] = mlflow.tracking.MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")
    assert DataLineage.from_tags(version.tags) == data_lineage(sample_shards)
    assert version.tags["lineage.datasets"] == '["hallo3", "hdtf", "voxceleb2"]'
    assert run.data.params["lineage.data_config_hash"] == version.tags["lineage.data_config_hash"]
    [read] = run.inputs.dataset_inputs  # and the run names the dataset it trained on
    assert {t.key: t.value for t in read.tags}["mlflow.data.context"] == "training"
    assert read.dataset.digest == data_lineage(sample_shards).manifest_sha256[:32]


@pytest.mark.integration
def test_a_refused_champion_is_replaced_by_one_trained_on_these_shards(sample_shards, local_ray, tmp_path, monkeypatch):
    """The embedded default (`score.train_if_missing=true`) in its own store: the session's champion stays."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    foreign = data_lineage(data_output(tmp_path / "real", DataJobConfig(input="/data/real"), ["real"]))
    register_syncnet(tmp_path, foreign.tags(), name="syncnet")
    config = job(tmp_path, "models:/syncnet@champion", train_if_missing=True, syncnet_steps=2,
                 syncnet_output=str(tmp_path / "trained"))  # fmt: skip

    choice = choose_syncnet(config, sample_shards)

    assert (choice.uri, choice.version) == ("models:/syncnet/2", "2")
    assert choice.lineage == data_lineage(sample_shards)
    assert choice.weights == str(tmp_path / "trained" / "syncnet.pt") and storage.exists(choice.weights)
    assert choice.reason.startswith("trained here on these shards, since models:/syncnet@champion (version 1) was trained on other data")
