"""`make syncnet` on the sample shards: it learns, validates offsets, registers, and resumes."""

from __future__ import annotations

import io
import os
import tarfile

import mlflow
import pytest

from lipforcing import storage
from pipelines.jobs import resolve_config
from pipelines.syncnet import SyncNetJobConfig, is_validation
from pipelines.syncnet import main as train_syncnet

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def query_the_session_store(mlflow_store):
    """Read runs from the store the jobs wrote to (another test may have pointed MLflow elsewhere)."""
    mlflow.set_tracking_uri(mlflow_store)


def history(run_id: str, key: str) -> list:
    return sorted(mlflow.tracking.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)


def syncnet_runs(output: str) -> list:
    return mlflow.search_runs(
        experiment_names=["lipforcing"], filter_string=f"tags.job = 'syncnet' and params.output = '{output}'",
        order_by=["start_time ASC"], output_format="list",
    )  # fmt: skip


def test_syncnet_job_trains_registers_and_recovers_offsets(trained_syncnet):
    output = os.path.dirname(trained_syncnet)
    [run] = syncnet_runs(output)
    losses = [m.value for m in history(run.info.run_id, "loss")]
    assert len(losses) == 40
    assert sum(losses[-5:]) < sum(losses[:5])
    assert run.data.metrics["offset_recovery_rate"] >= 0.6
    assert run.data.metrics["val_accuracy"] > 0.5  # better than a coin on held-out pairs
    assert storage.exists(trained_syncnet)
    assert "train:" in storage.read_text(storage.join(output, "config.yaml"))
    registered = mlflow.tracking.MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")
    assert [v.name for v in registered] == ["syncnet"]


def test_rerun_resumes_from_the_last_checkpoint(sample_shards, tmp_path, monkeypatch):
    """Its own short run in its own MLflow store: the session's SyncNet and its alias stay as they are."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    output = str(tmp_path / "syncnet")
    for steps in (4, 6):
        config = resolve_config(
            SyncNetJobConfig, [f"data={sample_shards}", f"output={output}", f"train.steps={steps}", "train.checkpoint_every=2"]
        )
        assert train_syncnet(config) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    first, resumed = syncnet_runs(output)
    assert [m.step for m in history(first.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in history(resumed.info.run_id, "loss")] == [5, 6]  # continued after iteration 4


def training_keys(shard: bytes) -> set[str]:
    """Keys of the samples in a tar shard that the SyncNet job trains on (not held out for validation)."""
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        keys = {member.name.split(".", 1)[0] for member in tar.getmembers()}
    return {key for key in keys if not is_validation(key, SyncNetJobConfig.val_fraction)}


def test_two_workers_train_on_a_single_shard(sample_shards, local_ray, mlflow_store, tmp_path):
    """A `make data` whose input gave one aligned shard once spun one worker at full CPU and parked
    the other in a collective, forever: each rank now resamples the shard with its own seed."""
    one = str(tmp_path / "one")
    # Sample keys hash the (temporary) input paths, so which shard holds training clips varies by run:
    # take the shard with the most, else a shard of held-out clips alone would (rightly) fail the job.
    shards = {url: training_keys(storage.read_bytes(url)) for url in storage.glob(storage.join(sample_shards, "shards", "*.tar"))}
    chosen = max(shards, key=lambda url: len(shards[url]))
    assert shards[chosen], "no sample shard holds a training clip"
    storage.write_bytes(storage.join(one, "shards", "00000.tar"), storage.read_bytes(chosen))
    output = str(tmp_path / "syncnet")
    config = resolve_config(SyncNetJobConfig, [f"data={one}", f"output={output}", "train.steps=4", "train.checkpoint_every=4", "train.num_workers=2"])
    assert train_syncnet(config) == 0
    [run] = syncnet_runs(output)
    assert [m.step for m in history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.metrics["data/skipped_samples"] == 0


def test_a_new_syncnet_moves_the_champion_only_through_the_gate(sample_shards, local_ray, tmp_path, monkeypatch):
    """In its own store: the first SyncNet becomes champion; the same training again (same seed, same
    data, so the same held-out numbers) improves nothing and is refused, staying @challenger; forced
    (`promotion.mode=always`), a third moves the alias and says why."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")

    def train(name: str, *args: str) -> None:
        config = resolve_config(SyncNetJobConfig, [f"data={sample_shards}", f"output={tmp_path / name}", "train.steps=6", *args])
        assert train_syncnet(config) == 0

    train("first")
    assert client.get_model_version_by_alias("syncnet", "champion").version == 1
    train("again")
    again = client.get_model_version("syncnet", "2")
    assert again.tags["promotion.decision"] == "refused" and "is better" in again.tags["promotion.reason"]
    assert again.tags["promotion.champion_before"] == "1"
    assert client.get_model_version_by_alias("syncnet", "champion").version == 1
    assert client.get_model_version_by_alias("syncnet", "challenger").version == 2
    train("forced", "promotion.mode=always")
    forced = client.get_model_version_by_alias("syncnet", "champion")
    assert forced.version == 3 and forced.tags["promotion.reason"].startswith("promotion forced")
