"""The shared trainer on real Ray Train workers with real DeepSpeed (ZeRO-2, gloo, CPU)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import psutil
import pytest
import ray
import ray.cloudpickle
import torch

from lipforcing.config import load_config
from pipelines import tracking
from pipelines.deepspeed_setup import deepspeed_config
from pipelines.trainer import Stage, TrainerConfig, fit, learning_rate_at

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules


@dataclass
class ToyJob:
    marker_dir: str = ""
    seed: int = 0
    kill_at: int = -1  # iteration at which rank 1 is killed, once
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=12, lr=0.1, batch_size=16, checkpoint_every=4))


class ToyRegression(Stage):
    """Fit y = 0.5 sum(x) + 0.2 with a linear layer: the loss must fall, and the state must survive a kill."""

    name = "toy"

    def networks(self):
        torch.manual_seed(0)
        return {"model": torch.nn.Linear(4, 1)}

    def batches(self, start):
        generator = torch.Generator().manual_seed(self.context.rank)
        while True:
            x = torch.randn(self.context.trainer.batch_size, 4, generator=generator)
            yield x, 0.5 * x.sum(dim=1, keepdim=True) + 0.2

    def step(self, engines, batch, iteration, micro):
        job = self.context.config
        if self.context.rank == 1 and iteration == job.kill_at and micro == 0:
            marker = Path(job.marker_dir) / "killed"
            if not marker.exists():
                marker.write_text(str(iteration))
                time.sleep(3)  # let the controller collect the iteration-4 checkpoint, as real steps do
                os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, mid-stage
        x, y = batch
        engine = engines["model"]
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        return {"loss": loss.item()}

    def load_state(self, state):
        (Path(self.context.config.marker_dir) / f"resumed-{self.context.rank}").write_text(str(state["seen"]))

    def state(self):
        return {"seen": "yes"}


@dataclass
class TwoRateJob:
    marker_dir: str = ""
    seed: int = 0
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=5, lr=0.01, grad_accum=3, checkpoint_every=5))


class TwoRates(Stage):
    """Two networks: `fast` steps every iteration, `slow` every second one (as DMD's student does)."""

    name = "two_rates"

    def networks(self):
        torch.manual_seed(0)
        return {"fast": torch.nn.Linear(2, 1), "slow": torch.nn.Linear(2, 1)}

    def updates(self, iteration, names):
        return names if iteration % 2 == 0 else ("fast",)

    def batches(self, start):
        self.consumed = 0
        while True:
            self.consumed += 1
            yield torch.randn(2, 2)

    def step(self, engines, batch, iteration, micro):
        for name in self.updates(iteration, ("fast", "slow")):
            engines[name].backward(engines[name](batch).pow(2).mean())
        return {"micro": float(micro)}

    def finish(self, engines, output_dir):
        (Path(self.context.config.marker_dir) / f"consumed-{self.context.rank}").write_text(str(self.consumed))
        return {}


class WithFrozenTeacher(Stage):
    """A trained student regressing onto a frozen teacher (as DMD reads its teacher)."""

    name = "frozen"

    def networks(self):
        torch.manual_seed(0)
        return {"student": torch.nn.Linear(512, 255)}

    def frozen_networks(self):
        torch.manual_seed(1)
        return {"teacher": torch.nn.Linear(512, 255)}

    def batches(self, start):
        while True:
            yield torch.randn(4, 512)

    def step(self, engines, batch, iteration, micro):
        teacher = engines["teacher"]
        dtype = next(getattr(teacher, "module", teacher).parameters()).dtype
        with torch.no_grad():
            target = teacher(batch.to(dtype)).float()
        student = engines["student"]
        loss = torch.nn.functional.mse_loss(student(batch.to(dtype)).float(), target)
        student.backward(loss)
        return {"loss": loss.item(), "teacher_bf16": float(dtype == torch.bfloat16)}


def _run(tmp_path, name, output=None, **overrides):
    job = load_config(ToyJob, overrides=[f"marker_dir={tmp_path}", *[f"{k}={v}" for k, v in overrides.items()]])
    with tracking.start_run(name, root=tmp_path / "outputs") as run:
        result = fit(
            ToyRegression,
            job,
            job.train,
            run_name=name,
            output=output or str(tmp_path),
            run_id=run.info.run_id,
            tracking_uri=mlflow.get_tracking_uri(),
        )
    return result, mlflow.get_run(run.info.run_id), run.info.run_id


def test_two_workers_zero2_train_and_log(local_ray, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result, run, run_id = _run(tmp_path, "toy")
    assert result.error is None
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 12
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3])
    metrics = run.data.metrics
    assert metrics["lr/model"] == 0.1  # constant schedule, no warmup
    assert metrics["optimizer_steps/model"] == 12 and metrics["micro_batches"] == 1
    assert metrics["resident_mb/model"] * 2**20 == 5 * 4  # Linear(4, 1) in fp32, whole under ZeRO-2
    assert metrics["samples_per_s"] > 0 and metrics["iteration_time_s"] > 0 and metrics["memory_gb"] > 0
    assert metrics["data_stall_fraction"] < 0.5  # batches are generated in memory
    assert math.isfinite(metrics["grad_norm/model"])
    assert result.checkpoint is not None
    assert sorted(os.listdir(result.checkpoint.path)) == ["model", "progress.json"]
    progress = json.loads((Path(result.checkpoint.path) / "progress.json").read_text())
    assert progress == {"stage": "toy", "iteration": 12, "world_size": 2, "optimizer_steps": {"model": 12}}
    files = sorted(os.listdir(os.path.join(result.checkpoint.path, "model", "state")))
    # ZeRO-2 keeps one optimizer shard per rank: both ranks' files were merged into one checkpoint.
    assert sum("optim_states" in f for f in files) == 2


def test_killed_worker_resumes_from_last_checkpoint(local_ray, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result, run, run_id = _run(tmp_path, "toy-kill", kill_at=6)
    assert (tmp_path / "killed").read_text() == "6"
    assert result.error is None
    # both ranks restored the stage state from the checkpoint written at iteration 4
    assert (tmp_path / "resumed-0").read_text() == "yes"
    assert (tmp_path / "resumed-1").read_text() == "yes"
    assert result.metrics["iteration"] == 12
    steps = sorted({m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "loss")})
    assert steps == list(range(1, 13))  # the counter continued: no gap, nothing beyond the end


def test_rerun_with_same_name_continues_instead_of_restarting(local_ray, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _run(tmp_path, "toy-rerun", **{"train.steps": 4})
    result, _, _ = _run(tmp_path, "toy-rerun", **{"train.steps": 8})
    assert (tmp_path / "resumed-0").exists()
    assert result.metrics["iteration"] == 8


def test_an_iteration_is_one_optimizer_step_over_all_micro_batches(local_ray, tmp_path, monkeypatch):
    """grad_accum=3: every iteration reads 3 micro-batches per rank and steps each network it updates
    exactly once; a network updated every second iteration counts its own steps (DMD's 5:1)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = load_config(TwoRateJob, overrides=[f"marker_dir={tmp_path}"])
    with tracking.start_run("two-rates", root=tmp_path / "outputs") as run:
        result = fit(TwoRates, job, job.train, "two-rates", str(tmp_path), run.info.run_id, mlflow.get_tracking_uri())
    assert result.error is None
    client = mlflow.tracking.MlflowClient()

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    assert history("optimizer_steps/fast") == [1, 2, 3, 4, 5]
    assert history("optimizer_steps/slow") == [1, 1, 2, 2, 3]  # iterations 0, 2, 4
    assert history("micro_batches") == [3] * 5
    assert history("micro") == [1.0] * 5  # the mean of micro-batch indices 0, 1, 2
    for rank in (0, 1):
        assert (tmp_path / f"consumed-{rank}").read_text() == "15"  # 5 iterations x 3 micro-batches


@dataclass
class GlobalBatchJob:
    output: str = ""
    seed: int = 0
    train: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(steps=3, lr=0.05, batch_size=1, effective_batch=4, weight_decay=0.0, checkpoint_every=3)
    )


class GlobalBatch(Stage):
    """Each sample is a function of its index in the global batch of its iteration, so any worker
    count that makes the same effective batch sees the same samples and must reach the same weights."""

    name = "global-batch"

    def networks(self):
        torch.manual_seed(0)
        return {"model": torch.nn.Linear(4, 1)}

    def batches(self, start):
        trainer, rank = self.context.trainer, self.context.rank
        for iteration in itertools.count(start):
            for micro in range(trainer.grad_accum):
                first = iteration * trainer.effective_batch + (rank * trainer.grad_accum + micro) * trainer.batch_size
                x = torch.stack([torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(first, first + trainer.batch_size)])
                yield x, 0.5 * x.sum(dim=1, keepdim=True) + 0.2

    def step(self, engines, batch, iteration, micro):
        x, y = batch
        loss = torch.nn.functional.mse_loss(engines["model"](x), y)
        engines["model"].backward(loss)
        return {"loss": loss.item()}

    def finish(self, engines, output_dir):
        if self.context.rank == 0:
            path = Path(self.context.config.output) / f"weights-{self.context.world_size}.pt"
            torch.save({k: v.detach().clone() for k, v in engines["model"].module.state_dict().items()}, path)
        return {"grad_accum": float(self.context.trainer.grad_accum)}


def test_the_effective_batch_trains_alike_on_any_worker_count(local_ray, tmp_path, monkeypatch):
    """effective_batch=4: 2 workers accumulate 2 micro-batches, 1 worker 4; same samples, same weights."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = load_config(GlobalBatchJob, overrides=[f"output={tmp_path}"])
    for workers in (2, 1):
        trainer = dataclasses.replace(job.train, num_workers=workers)
        with tracking.start_run(f"global-{workers}", root=tmp_path / "outputs") as run:
            assert fit(GlobalBatch, job, trainer, f"global-{workers}", str(tmp_path), run.info.run_id, mlflow.get_tracking_uri()).error is None
        assert mlflow.get_run(run.info.run_id).data.metrics["grad_accum"] == 4 / workers
    start = GlobalBatch.networks(None)["model"].state_dict()
    two, one = torch.load(tmp_path / "weights-2.pt"), torch.load(tmp_path / "weights-1.pt")
    for key in start:
        assert not torch.allclose(two[key], start[key])  # trained
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


def test_each_node_logs_its_system_metrics_into_the_stage_run(local_ray, tmp_path, monkeypatch):
    """The worker with local rank 0 samples its node (one node here: one prefix, never two)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result, run, run_id = _run(tmp_path, "toy-system", **{"train.steps": 6, "train.system_metrics_every_s": 0.2})
    assert result.error is None
    nodes = {key.split("/")[1] for key in run.data.metrics if key.startswith("system/")}
    node_id = ray.get_runtime_context().get_node_id()[:6]
    assert len(nodes) == 1 and next(iter(nodes)).endswith(node_id)
    node = next(iter(nodes))
    assert 0 < run.data.metrics[f"system/{node}/system_memory_usage_megabytes"] < psutil.virtual_memory().total / 2**20
    assert f"system/{node}/cpu_utilization_percentage" in run.data.metrics


def test_the_worker_count_comes_from_the_cluster_and_derives_the_accumulation(local_ray):
    from lipforcing.config import ConfigError
    from pipelines.trainer import placed

    assert placed(TrainerConfig(num_workers=2, batch_size=2, effective_batch=16)).grad_accum == 4
    assert placed(TrainerConfig(num_workers=1, batch_size=2, effective_batch=16)).grad_accum == 8
    assert placed(TrainerConfig(num_workers=2, grad_accum=3)).grad_accum == 3  # no contract: as given
    with pytest.raises(ConfigError, match=r"'dmd.train.effective_batch' = 6 is not a multiple of 'dmd.train.batch_size' x workers = 2 x 2; worker counts that fit: \[1, 3\]"):
        placed(TrainerConfig(num_workers=2, batch_size=2, effective_batch=6), "dmd.train")
    with pytest.raises(ConfigError, match=r"'student.train.num_workers' is unset, which means one worker per GPU, but the Ray cluster has none"):
        placed(TrainerConfig(num_workers=None), "student.train")


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_frozen_network_is_held_in_training_precision_and_sharded_under_zero3(local_ray, tmp_path, monkeypatch, zero_stage):
    """bf16 training keeps the frozen teacher in bf16 (half its fp32 bytes), and ZeRO-3 leaves each of
    the 2 ranks only its half of the weight matrix (130,560 elements; tensors under DeepSpeed's
    persistence threshold of 100,000, like the bias, stay whole on every rank)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = load_config(ToyJob, overrides=[f"marker_dir={tmp_path}", "train.steps=2", "train.precision=bf16", f"train.zero_stage={zero_stage}"])
    with tracking.start_run("frozen", root=tmp_path / "outputs") as run:
        result = fit(WithFrozenTeacher, job, job.train, f"frozen-{zero_stage}", str(tmp_path), run.info.run_id, mlflow.get_tracking_uri())
    assert result.error is None
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert metrics["teacher_bf16"] == 1.0
    weight, bias = 512 * 255, 255
    held = (weight // 2 if zero_stage == 3 else weight) + bias
    assert metrics["resident_mb/teacher"] * 2**20 == pytest.approx(2 * held)  # 2 bytes per bf16 weight
    assert metrics["optimizer_steps/student"] == 2 and "optimizer_steps/teacher" not in metrics


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0]),
        ("cosine", [0.25, 0.5, 0.75, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4)), 0.0]),
    ],
)
def test_learning_rate_counts_iterations(schedule, expected):
    config = TrainerConfig(steps=8, warmup_steps=4, schedule=schedule)
    assert [learning_rate_at(config, 1.0, i) for i in range(8)] == pytest.approx(expected)
    assert learning_rate_at(TrainerConfig(steps=8), 2e-6, 0) == 2e-6  # no warmup: the full rate at once


def test_random_streams_differ_by_rank_and_micro_batch_but_shared_choices_agree():
    from pipelines.trainer import WorkerContext

    def context(rank):
        return WorkerContext(rank, 2, rank, torch.device("cpu"), TwoRateJob(), TrainerConfig(), None, None)

    draws = {(r, i, m): float(torch.rand(1, generator=context(r).generator(i, m))) for r in (0, 1) for i in (0, 1) for m in (0, 1)}
    assert len(set(draws.values())) == len(draws)
    assert float(torch.rand(1, generator=context(0).generator(3, 1))) == float(torch.rand(1, generator=context(0).generator(3, 1)))
    picks = [[context(r).shared_choice(i, m, 1000) for i in range(4) for m in range(3)] for r in (0, 1)]
    assert picks[0] == picks[1] and len(set(picks[0])) > 6


def test_deepspeed_config_follows_trainer_config():
    config = TrainerConfig(batch_size=2, grad_accum=3, zero_stage=3, precision="bf16", betas=[0.0, 0.999])
    ds = deepspeed_config(config, world_size=4, lr=2e-6)
    assert ds["train_batch_size"] == 24
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["betas"] == [0.0, 0.999]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["gradient_clipping"] == 10.0
    assert ds["gradient_accumulation_steps"] == 3
    assert "scheduler" not in ds  # the trainer sets each iteration's rate (DeepSpeed's would count steps)


def test_checkpoints_on_object_storage_and_resume_from_there(local_ray, s3_bucket, tmp_path, monkeypatch):
    """`output` on S3 (the local server): engine shards of both ranks land under the run's
    prefix, and a rerun with more steps continues from the checkpoint read back from the bucket."""
    from lipforcing import storage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _run(tmp_path, "toy-s3", s3_bucket, **{"train.steps": 4})
    shards = storage.glob(f"{s3_bucket}/ray/toy-s3/checkpoint_*/model/state/*optim_states*")
    assert len(shards) == 2  # one ZeRO-2 optimizer shard per rank, in the bucket
    files = storage.glob(f"{s3_bucket}/ray/toy-s3/checkpoint_*/**")
    files = [f for f in files if not storage.filesystem(f)[0].isdir(storage.filesystem(f)[1])]
    result, run, _ = _run(tmp_path, "toy-s3", s3_bucket, **{"train.steps": 8})
    assert (tmp_path / "resumed-0").read_text() == "yes"
    assert result.metrics["iteration"] == 8
    assert run.data.metrics["restore_files"] == len(files) - 1  # all but the other rank's optimizer shard


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_stage_stopped_on_two_workers_continues_on_one(local_ray, tmp_path, monkeypatch, zero_stage):
    """The checkpoint of 2 ZeRO ranks is resharded for 1 (DeepSpeed's universal checkpoint): the
    iteration, the optimizer's step count and the learned weights carry on."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = f"toy-reshard-{zero_stage}"
    _, _, first_id = _run(tmp_path, name, **{"train.steps": 4, "train.num_workers": 2, "train.zero_stage": zero_stage})
    result, run, run_id = _run(tmp_path, name, **{"train.steps": 8, "train.num_workers": 1, "train.zero_stage": zero_stage})
    assert result.error is None and result.metrics["iteration"] == 8
    assert run.data.metrics["restored_world_size"] == 2
    assert run.data.metrics["optimizer_steps/model"] == 8  # 4 restored + 4 on one worker
    client = mlflow.tracking.MlflowClient()  # of the runs' store, which _run set

    def losses(run_id):
        return [m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)]

    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [5, 6, 7, 8]
    assert losses(run_id)[0] < 0.7 * losses(first_id)[0]  # it goes on from the trained weights, not from scratch


def test_a_cluster_without_the_resources_is_refused_with_the_keys(local_ray):
    """The session's Ray has 2 CPUs and no GPU: GPUs are used only when present, and asking for
    what is not there is a config error naming the keys, not a job waiting forever."""
    from lipforcing.config import ConfigError
    from pipelines.trainer import placed

    assert placed(TrainerConfig(num_workers=2)).use_gpu is False  # None: GPUs only where the cluster has them
    with pytest.raises(ConfigError, match=r"'dmd.train.use_gpu' is true but the Ray cluster has 0 GPUs for 2 workers"):
        placed(TrainerConfig(num_workers=2, use_gpu=True), "dmd.train")
    with pytest.raises(ConfigError, match=r"'student.train.num_workers' x 'student.train.cpus_per_worker' = 3 CPUs"):
        placed(TrainerConfig(num_workers=3), "student.train")
