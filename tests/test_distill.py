"""`make distill` end to end on the tiny profile: real Ray Train workers, DeepSpeed ZeRO-2 and ZeRO-3, MLflow."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

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
            "teacher.base.steps=4", "teacher.base.checkpoint_every=2",
            "teacher.train.steps=3", "teacher.train.checkpoint_every=3",
            "student.train.steps=3", "student.train.checkpoint_every=3", "student.train.sample_every=2",
            "dmd.train.steps=6", "dmd.train.checkpoint_every=3", "dmd.student_every=5",
        ],
    )  # fmt: skip
    assert distill(config) == 0
    return output, config


def test_parent_run_with_nested_stage_runs(distilled):
    output, _ = distilled
    # the fixture's run is the first distill into this output (the rerun test may add a second)
    parent = mlflow.search_runs(
        experiment_names=["lipforcing"], filter_string=f"tags.job = 'distill' and params.output = '{output}'",
        order_by=["start_time ASC"], output_format="list",
    )[0]  # fmt: skip
    children = mlflow.search_runs(
        experiment_names=["lipforcing"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list"
    )
    by_name = {run.info.run_name: run for run in children}
    assert {"teacher", "student", "dmd"} <= set(by_name)
    assert parent.data.params["model.profile"] == "tiny"
    assert parent.data.params["teacher.base_init"].startswith("random init")
    for name in ("teacher_base", "teacher", "student", "dmd"):
        assert storage.exists(storage.join(output, name, "dit.safetensors")), name
    for name, key, steps in (("teacher", "teacher_loss", 3), ("student", "loss", 3), ("dmd", "fake_score_loss", 6)):
        history = mlflow.tracking.MlflowClient().get_metric_history(by_name[name].info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), name  # one value per iteration
        assert all(math.isfinite(m.value) for m in history), name
        assert by_name[name].data.params["train.zero_stage"] == "2"
        assert by_name[name].data.params["train.num_workers"] == "2"
        videos = mlflow.artifacts.list_artifacts(run_id=by_name[name].info.run_id, artifact_path="samples")
        periodic = [f"samples/{name}-step000002.mp4"] if name == "student" else []  # sample_every=2 of 3 steps
        assert sorted(v.path for v in videos) == sorted([f"samples/{name}.mp4", *periodic])
        assert all(v.file_size > 0 for v in videos)


def test_dmd_counters_cfg_fraction_reward_and_registration(distilled):
    _, config = distilled
    run = mlflow.search_runs(
        experiment_names=["lipforcing"], filter_string=f"tags.ray_run = '{config.run_name}-dmd'", output_format="list"
    )[0]
    metrics = run.data.metrics
    assert metric_history(run.info.run_id, "optimizer_steps/fake_score") == [1, 2, 3, 4, 5, 6]  # every iteration
    assert metric_history(run.info.run_id, "optimizer_steps/student") == [1, 1, 1, 1, 1, 2]  # iterations 0 and 5
    assert metric_history(run.info.run_id, "micro_batches") == [1] * 6
    # rank 0's re-noising times of its two student iterations, replayed from the same random streams:
    # the share of them inside the ODE-step 20..40 band is the logged CFG share
    from lipforcing.diffusion.schedules import sync_window
    from pipelines.stages.dmd import dmd_timesteps
    from pipelines.trainer import stream_seed

    low, high = sync_window(*config.dmd.window_steps)
    times = [dmd_timesteps(1, config.dmd, 5.0, torch.Generator().manual_seed(stream_seed(config.seed, i, 0, 0))) for i in (0, 5)]
    assert metrics["cfg_fraction_total"] == pytest.approx(sum(low <= float(t) <= high for t in times) / 2)
    assert metrics["exported_ema"] == 0.0  # released: the raw student is exported
    assert metric_history(run.info.run_id, "reward_weight_mean")  # the SyncNet reward was applied
    client = mlflow.tracking.MlflowClient()
    assert [v.name for v in client.search_model_versions(f"run_id = '{run.info.run_id}'")] == ["lipforcing-student"]
    newest = max(int(v.version) for v in client.search_model_versions("name = 'lipforcing-student'"))
    candidate = client.get_model_version_by_alias("lipforcing-student", "candidate")
    assert int(candidate.version) == newest  # moved on each registration
    # The version says what it learned from: the shards' manifest and the reward's SyncNet version.
    manifest = storage.read_bytes(storage.join(config.data, "manifest.parquet"))
    assert candidate.tags["lineage.manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert candidate.tags["upstream.syncnet"] == "models:/syncnet@champion"
    assert candidate.tags["upstream.syncnet.version"].startswith("syncnet/")


def test_rerun_skips_finished_stages(distilled):
    output, config = distilled
    stamp = storage.filesystem(storage.join(output, "student", "dit.safetensors"))
    before = stamp[0].info(stamp[1])["mtime"]
    assert distill(dataclasses.replace(config, stages=["teacher", "student"])) == 0  # the fixture's config stays
    assert stamp[0].info(stamp[1])["mtime"] == before
    skipped = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.skipped = 'true'", output_format="list")
    assert {run.info.run_name for run in skipped} == {"teacher", "student"}


def test_zero3_every_stage_exports_whole_weights(distilled, tmp_path):
    """ZeRO-3 shards every parameter across the two workers; sample videos rendered mid-run (rank 0
    alone, right after the first step) must not hang the others, the exported checkpoints must still
    be whole (same shapes as a freshly built model) and the DMD run must have moved the student."""
    from safetensors.torch import load_file

    from lipforcing.models import build_student

    _, config = distilled
    zero3 = resolve_config(
        DistillConfig,
        [
            f"data={config.data}", f"output={tmp_path}", "run_name=zero3", "teacher.base.steps=0",
            "teacher.train.zero_stage=3", "teacher.train.steps=2", "teacher.train.checkpoint_every=2",
            "teacher.train.sample_every=1",
            "student.train.zero_stage=3", "student.train.steps=2", "student.train.checkpoint_every=2",
            "dmd.train.zero_stage=3", "dmd.train.steps=2", "dmd.train.checkpoint_every=2", "dmd.student_every=1",
            "dmd.train.sample_every=1", "dmd.train.precision=bf16",
        ],
    )  # fmt: skip
    assert distill(zero3) == 0
    fresh = build_student(config.model).state_dict()
    exported = {stage: load_file(tmp_path / stage / "dit.safetensors") for stage in ("teacher", "student", "dmd")}
    for weights in exported.values():
        assert set(weights) == set(fresh)
        assert all(weights[name].shape == tensor.shape for name, tensor in fresh.items())
    assert any(not torch.equal(exported["student"][name], exported["dmd"][name]) for name in fresh)
    for stage in ("teacher", "dmd"):
        run = mlflow.search_runs(
            experiment_names=["lipforcing"], filter_string=f"tags.ray_run = 'zero3-{stage}'", output_format="list"
        )[0]
        assert run.data.params["train.zero_stage"] == "3"
        videos = {v.path for v in mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="samples")}
        assert videos == {f"samples/{stage}-step000001.mp4", f"samples/{stage}.mp4"}
    assert run.data.metrics["optimizer_steps/student"] == 2
    # the frozen teacher is held in bf16, as the trained networks compute (not copied whole in fp32);
    # at tiny size every tensor is under ZeRO-3's persistence threshold, so each rank holds it all
    teacher_numel = sum(t.numel() for t in fresh.values())
    assert run.data.metrics["resident_mb/teacher"] * 2**20 == pytest.approx(2 * teacher_numel)


def killing_dmd(marker: str, kill_at: int):
    """The real DMD stage, except that rank 1 SIGKILLs itself once, at iteration `kill_at`
    (defined in a function so Ray ships the class by value to workers that cannot import tests)."""
    import os
    import signal
    import time
    from pathlib import Path

    from pipelines.stages.dmd import DistributionMatching

    class KillingDistributionMatching(DistributionMatching):
        def step(self, engines, batch, iteration, micro):
            if self.context.rank == 1 and iteration == kill_at and not Path(marker).exists():
                Path(marker).write_text(str(iteration))
                time.sleep(3)  # let the controller collect the last checkpoint, as a real step's time does
                os.kill(os.getpid(), signal.SIGKILL)
            return super().step(engines, batch, iteration, micro)

    return KillingDistributionMatching


def test_dmd_worker_killed_mid_stage_resumes_with_its_counters(distilled, tmp_path):
    """A worker death mid-DMD: the stage restarts from its last checkpoint with the iteration counter,
    each network's optimizer-step count (the 5:1 counters, in the engines' checkpoints) and the stage
    state restored, so it ends where an unbroken run ends."""
    import shutil

    from pipelines import tracking
    from pipelines.distill import resolve_models, run_stage

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
    resolve_models(resumed)
    marker = tmp_path / "killed"
    with tracking.start_run("distill-kill") as parent:
        run_stage(killing_dmd(str(marker), kill_at=5), resumed, resumed.dmd.train, "dmd", parent.info.run_id)
    assert marker.read_text() == "5"
    run = mlflow.search_runs(
        experiment_names=["lipforcing"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list"
    )[0]
    logged = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "fake_score_loss")]
    assert sorted(set(logged)) == [1, 2, 3, 4, 5, 6]
    # step 5 ran before the kill and again after it: the restart continued from the iteration-4 checkpoint
    assert sorted(step for step in set(logged) if logged.count(step) > 1) == [5]
    assert metric_history(run.info.run_id, "optimizer_steps/fake_score")[-1] == 6  # 4 restored + 2
    assert metric_history(run.info.run_id, "optimizer_steps/student")[-1] == 2  # iterations 0 and 5
    checkpoints = [p for p in (tmp_path / "ray" / "kill-dmd").glob("checkpoint_*") if p.is_dir()]
    iterations = sorted(json.loads((p / "progress.json").read_text())["iteration"] for p in checkpoints)
    assert iterations == [4, 6]  # keep_checkpoints=2: the newest two, the one resumed from included
    assert storage.exists(storage.join(str(tmp_path), "dmd", "dit.safetensors"))
