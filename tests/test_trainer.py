"""The shared trainer on real Ray Train workers with real DeepSpeed (ZeRO-2, gloo, CPU)."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import ray.cloudpickle
import torch

from lipforcing.config import load_config
from pipelines import tracking
from pipelines.deepspeed_setup import deepspeed_config
from pipelines.trainer import Stage, TrainerConfig, fit

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules


@dataclass
class ToyJob:
    marker_dir: str = ""
    kill_at: int = -1  # iteration at which rank 1 is killed, once
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(steps=12, lr=0.1, batch_size=16, checkpoint_every=4))


class ToyRegression(Stage):
    """Fit y = 0.5 sum(x) + 0.2 with a linear layer: the loss must fall, and the state must survive a kill."""

    name = "toy"

    def networks(self):
        torch.manual_seed(0)
        return {"model": torch.nn.Linear(4, 1)}

    def batches(self):
        generator = torch.Generator().manual_seed(self.context.rank)
        while True:
            x = torch.randn(self.context.trainer.batch_size, 4, generator=generator)
            yield x, 0.5 * x.sum(dim=1, keepdim=True) + 0.2

    def step(self, engines, batch, iteration):
        job = self.context.config
        if self.context.rank == 1 and iteration == job.kill_at:
            marker = Path(job.marker_dir) / "killed"
            if not marker.exists():
                marker.write_text(str(iteration))
                time.sleep(3)  # let the controller collect the iteration-4 checkpoint, as real steps do
                os.kill(os.getpid(), signal.SIGKILL)  # a real worker death, mid-stage
        x, y = batch
        engine = engines["model"]
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        return {"loss": loss.item()}

    def load_state(self, state):
        (Path(self.context.config.marker_dir) / f"resumed-{self.context.rank}").write_text(str(state["seen"]))

    def state(self):
        return {"seen": "yes"}


def _run(tmp_path, name, storage_path=None, **overrides):
    job = load_config(ToyJob, overrides=[f"marker_dir={tmp_path}", *[f"{k}={v}" for k, v in overrides.items()]])
    with tracking.start_run(name, root=tmp_path / "outputs") as run:
        result = fit(
            ToyRegression,
            job,
            job.train,
            run_name=name,
            storage_path=storage_path or str(tmp_path / "ray"),
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
    for key in ("lr/model", "grad_norm/model", "samples_per_s", "data_stall_fraction", "step_time_s", "memory_gb"):
        assert key in run.data.metrics
    assert result.checkpoint is not None
    assert sorted(os.listdir(result.checkpoint.path))  == ["model"]
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


def test_deepspeed_config_follows_trainer_config():
    config = TrainerConfig(batch_size=2, grad_accum=3, zero_stage=3, precision="bf16", betas=[0.0, 0.999])
    ds = deepspeed_config(config, world_size=4, lr=2e-6)
    assert ds["train_batch_size"] == 24
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["betas"] == [0.0, 0.999]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["gradient_clipping"] == 10.0


def test_checkpoints_on_object_storage_and_resume_from_there(local_ray, s3_bucket, tmp_path, monkeypatch):
    """`storage_path` on S3 (the local server): engine shards of both ranks land under the run's
    prefix, and a rerun with more steps continues from the checkpoint read back from the bucket."""
    from lipforcing import storage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage_path = f"{s3_bucket}/ray"
    _run(tmp_path, "toy-s3", storage_path, **{"train.steps": 4})
    shards = storage.glob(f"{storage_path}/toy-s3/checkpoint_*/model/state/*optim_states*")
    assert len(shards) == 2  # one ZeRO-2 optimizer shard per rank, in the bucket
    result, _, _ = _run(tmp_path, "toy-s3", storage_path, **{"train.steps": 8})
    assert (tmp_path / "resumed-0").read_text() == "yes"
    assert result.metrics["iteration"] == 8
