"""`make distill` end to end on the tiny profile: real Ray Train workers, DeepSpeed ZeRO-2 and ZeRO-3, MLflow."""

from __future__ import annotations

import mlflow
import pytest
import torch

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
            "student.train.steps=3", "student.train.checkpoint_every=3", "student.train.sample_every=2",
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
        periodic = [f"samples/{name}-step000002.mp4"] if name == "student" else []  # sample_every=2 of 3 steps
        assert sorted(v.path for v in videos) == sorted([f"samples/{name}.mp4", *periodic])
        assert all(v.file_size > 0 for v in videos)


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


def test_zero3_student_and_dmd_export_whole_weights(distilled, tmp_path):
    """ZeRO-3 shards every parameter across the two workers; the exported checkpoints must still be
    whole (same shapes as a freshly built model) and the DMD run must have moved the student."""
    import shutil

    from safetensors.torch import load_file

    from lipforcing.models import build_student

    output, config = distilled
    for stage in ("teacher_base", "teacher"):
        shutil.copytree(f"{output}/{stage}", tmp_path / stage)
    zero3 = resolve_config(
        DistillConfig,
        [
            f"data={config.data}", f"output={tmp_path}", "stages=[student,dmd]",
            "student.train.zero_stage=3", "student.train.steps=2", "student.train.checkpoint_every=2",
            "dmd.train.zero_stage=3", "dmd.train.steps=2", "dmd.train.checkpoint_every=2", "dmd.student_every=1",
            "dmd.train.sample_every=1",  # a sample video mid-run: ZeRO hooks off for it, back on for step 2
        ],
    )  # fmt: skip
    assert distill(zero3) == 0
    fresh = build_student(config.model).state_dict()
    exported = {stage: load_file(tmp_path / stage / "dit.safetensors") for stage in ("student", "dmd")}
    for weights in exported.values():
        assert set(weights) == set(fresh)
        assert all(weights[name].shape == tensor.shape for name, tensor in fresh.items())
    assert any(not torch.equal(exported["student"][name], exported["dmd"][name]) for name in fresh)
    run = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.stage = 'dmd'", output_format="list")[0]
    assert run.data.params["train.zero_stage"] == "3"
    assert run.data.metrics["updates_student"] == 2
    videos = {v.path for v in mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="samples")}
    assert videos == {"samples/dmd-step000001.mp4", "samples/dmd.mp4"}


def killing_dmd(marker: str, kill_at: int):
    """The real DMD stage, except that rank 1 SIGKILLs itself once, at iteration `kill_at`
    (defined in a function so Ray ships the class by value to workers that cannot import tests)."""
    import os
    import signal
    import time
    from pathlib import Path

    from pipelines.stages.dmd import DistributionMatching

    class KillingDistributionMatching(DistributionMatching):
        def step(self, engines, batch, iteration):
            if self.context.rank == 1 and iteration == kill_at and not Path(marker).exists():
                Path(marker).write_text(str(iteration))
                time.sleep(3)  # let the controller collect the last checkpoint, as a real step's time does
                os.kill(os.getpid(), signal.SIGKILL)
            return super().step(engines, batch, iteration)

    return KillingDistributionMatching


def test_dmd_worker_killed_mid_stage_resumes_with_its_counters(distilled, tmp_path):
    """A worker death mid-DMD: the stage restarts from its last checkpoint with the step counter and
    the stage state (the 5:1 update counters, saved with the EMA) restored, so it ends where an
    unbroken run ends."""
    import shutil

    from pipelines import tracking
    from pipelines.distill import resolve_syncnet, run_stage

    output, config = distilled
    for stage in ("teacher", "student"):
        shutil.copytree(f"{output}/{stage}", tmp_path / stage)
    resumed = resolve_config(
        DistillConfig,
        [
            f"data={config.data}", f"output={tmp_path}", "run_name=kill",
            "dmd.train.steps=6", "dmd.train.checkpoint_every=2", "dmd.student_every=5",
        ],
    )  # fmt: skip
    resolve_syncnet(resumed, str(tmp_path))
    marker = tmp_path / "killed"
    with tracking.start_run("distill-kill") as parent:
        run_stage(killing_dmd(str(marker), kill_at=5), resumed, resumed.dmd.train, "dmd", parent.info.run_id)
    assert marker.read_text() == "5"
    run = mlflow.search_runs(
        experiment_names=["lipforcing"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list"
    )[0]
    assert sorted({m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "fake_score_loss")}) == [1, 2, 3, 4, 5, 6]
    # restored from the iteration-4 checkpoint: 4 + 2 fake-score updates, student at iterations 0 and 5
    assert metric_history(run.info.run_id, "updates_fake_score")[-1] == 6
    assert metric_history(run.info.run_id, "updates_student")[-1] == 2
    checkpoints = [p for p in (tmp_path / "ray" / "kill-dmd").glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 2  # keep_checkpoints: the iteration-4 and iteration-6 ones, nothing lost
    assert storage.exists(storage.join(str(tmp_path), "dmd", "dit.safetensors"))
