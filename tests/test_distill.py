"""`make distill` end to end on the tiny profile: real Ray Train workers, DeepSpeed ZeRO-2, MLflow."""

from __future__ import annotations

import mlflow
import pytest

from lipforcing import storage
from pipelines.distill import distill
from pipelines.distill_config import DistillConfig
from pipelines.jobs import resolve_config

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def query_the_session_store(mlflow_store):
    """Read runs from the store the jobs wrote to (another test may have pointed MLflow elsewhere)."""
    mlflow.set_tracking_uri(mlflow_store)


def metric_history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(mlflow.tracking.MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def distilled(sample_shards, trained_syncnet, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("distill"))
    config = resolve_config(
        DistillConfig,
        [
            f"data={sample_shards}", f"output={output}",
            "teacher.base_steps=4", "teacher.base.checkpoint_every=2",
            "teacher.train.steps=3", "teacher.train.checkpoint_every=3",
            "student.train.steps=3", "student.train.checkpoint_every=3",
            "dmd.train.steps=6", "dmd.train.checkpoint_every=3", "dmd.student_every=5",
        ],
    )  # fmt: skip
    assert distill(config) == 0
    return output, config


def test_parent_run_with_nested_stage_runs(distilled):
    output, _ = distilled
    parent = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.job = 'distill'", output_format="list")[0]
    children = mlflow.search_runs(
        experiment_names=["lipforcing"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list"
    )
    by_name = {run.info.run_name: run for run in children}
    assert {"teacher", "student", "dmd"} <= set(by_name)
    assert parent.data.params["model.profile"] == "tiny"
    assert parent.data.params["teacher.base_init"].startswith("random init")
    for name in ("teacher_base", "teacher", "student", "dmd"):
        assert storage.exists(storage.join(output, name, "dit.safetensors")), name
    for name, key in (("teacher", "teacher_loss"), ("student", "loss"), ("dmd", "fake_score_loss")):
        values = metric_history(by_name[name].info.run_id, key)
        assert values and all(v == v and abs(v) < 1e6 for v in values), (name, values)
        assert by_name[name].data.params["train.zero_stage"] == "2"
        assert by_name[name].data.params["train.num_workers"] == "2"
        videos = mlflow.artifacts.list_artifacts(run_id=by_name[name].info.run_id, artifact_path="samples")
        assert [v.path for v in videos] == [f"samples/{name}.mp4"] and videos[0].file_size > 0


def test_dmd_counters_cfg_fraction_reward_and_registration(distilled):
    run = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.stage = 'dmd'", output_format="list")[0]
    metrics = run.data.metrics
    assert metrics["updates_fake_score"] == 6  # every iteration
    assert metrics["updates_student"] == 2  # iterations 0 and 5: the 5:1 schedule
    assert 0.0 <= metrics["cfg_fraction_total"] <= 1.0
    assert metric_history(run.info.run_id, "reward_weight_mean")  # the SyncNet reward was applied
    version = mlflow.tracking.MlflowClient().get_model_version_by_alias("lipforcing-student", "candidate")
    assert version.run_id == run.info.run_id


def test_rerun_skips_finished_stages(distilled):
    output, config = distilled
    stamp = storage.filesystem(storage.join(output, "student", "dit.safetensors"))
    before = stamp[0].info(stamp[1])["mtime"]
    config.stages = ["teacher", "student"]
    assert distill(config) == 0
    assert stamp[0].info(stamp[1])["mtime"] == before
    skipped = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.skipped = 'true'", output_format="list")
    assert {run.info.run_name for run in skipped} == {"teacher", "student"}
