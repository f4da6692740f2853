"""Training benchmark at the tiny profile: what DeepSpeed + Ray Train cost, and per-stage throughput.

    python -m benchmarks.bench_train                        # print the markdown section
    python -m benchmarks.bench_train --write                # also replace "## Training" in RESULTS.md
    python -m benchmarks.bench_train --data /tmp/lf_data    # shards for part 3 (default outputs/data)

1. Plain PyTorch: the student (tiny DiT + the stage's LoRA) on one fixed random batch of encoded
   windows, Diffusion Forcing loss, torch AdamW + clipping, single process, 1 and 2 threads.
2. The same model, batch, loss and optimiser settings as a `Stage` run by `pipelines.trainer.fit`
   (Ray Train + DeepSpeed ZeRO-2, MLflow logging from rank 0) with 1 and 2 workers; samples/s and
   data stall are read back from the MLflow metric history, as a user would.
3. `pipelines.distill` on real shards (teacher_base, teacher, student, dmd; 6 steps each): samples/s
   and data-loader stall per stage from each nested MLflow run.
The first 2 steps of every run are warm-up and left out. Random weights: speed only, never quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.results import machine, report
from lipforcing.data.shards import shard_urls
from lipforcing.losses.diffusion_forcing import diffusion_forcing_loss
from lipforcing.models import build_student, random_condition
from lipforcing.models.conditioning import Condition
from lipforcing.models.lora import apply_lora
from pipelines.distill_config import DistillConfig
from pipelines.jobs import resolve_config
from pipelines.stages.student import StudentDiffusionForcing
from pipelines.trainer import Stage

HEADING = "## Training"
COMMAND = "python -m benchmarks.bench_train --write"
WARMUP = 2  # steps left out of every mean
STEPS = 24  # per run of parts 1 and 2
STAGE_STEPS = 6  # per stage of part 3
STAGES = ("teacher_base", "teacher", "student", "dmd")
TIME_FACTOR, SPACE_FACTOR = 4, 8  # Wan VAE: 4k + 1 frames -> k + 1 latent frames, 8x8 pixels -> 1


def tiny_config(data: str = "outputs/data") -> DistillConfig:
    """The `make distill` config of the tiny profile (profile YAML included)."""
    return resolve_config(DistillConfig, ["profile=tiny", f"data={data}"])


def student_model(config: DistillConfig) -> torch.nn.Module:
    """The student as its stage trains it: the tiny causal DiT with a fresh LoRA adapter."""
    cfg = config.model
    return apply_lora(build_student(cfg), cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)


def synthetic_batch(config: DistillConfig, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, Condition]:
    """Random clean latents [B, 16, F, h, w] and a condition shaped like one encoded window batch."""
    frames = (config.window.frames - 1) // TIME_FACTOR + 1
    side = config.window.size // SPACE_FACTOR
    g = torch.Generator().manual_seed(seed)
    cond = random_condition(config.model, batch_size, frames, side, side, g)
    x0 = torch.randn(batch_size, config.model.latent_channels, frames, side, side, generator=g)
    return x0, cond


def student_loss(model: Any, batch: tuple[torch.Tensor, Condition], config: DistillConfig, layout: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """The student stage's loss (the library's Diffusion Forcing loss with the stage's settings)."""
    x0, cond = batch
    student = config.student
    return diffusion_forcing_loss(model, x0, cond, student.noise_levels, config.model.chunk_frames, layout, generator, student.loss)


def plain_loop(config: DistillConfig, threads: int, steps: int = STEPS) -> dict[str, float]:
    """Samples/s of a single-process loop: forward, backward, clip, AdamW (the stage's settings)."""
    torch.set_num_threads(threads)
    train = config.student.train
    model = student_model(config)
    batch = synthetic_batch(config, train.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)
    times = []
    layouts = config.model.training_attention_layouts
    for iteration in range(steps):
        start = time.perf_counter()
        loss = student_loss(model, batch, config, tuple(layouts[iteration % len(layouts)]), torch.Generator().manual_seed(iteration))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        times.append(time.perf_counter() - start)
    measured = times[WARMUP:]
    return {"samples_per_s": train.batch_size * len(measured) / sum(measured), "load": os.getloadavg()[0]}


class SyntheticStudent(StudentDiffusionForcing):
    """The student stage with its shard reader and encoders replaced by one in-memory batch.

    Ray workers can load it: run as `python -m benchmarks.bench_train` it lives in `__main__`, which
    cloudpickle sends by value; imported, it is found because Ray puts the driver's working
    directory (the repo root, where `make bench` runs) on every worker's sys.path.
    """

    name = "bench_student"

    def __init__(self, context: Any):
        Stage.__init__(self, context)  # no encoders, no scratch folder: the batch is already latents

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"student": student_model(self.context.config)}

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, Condition]]:
        return itertools.repeat(synthetic_batch(self.context.config, self.context.trainer.batch_size, self.context.rank))

    def encode(self, batch: tuple[torch.Tensor, Condition]) -> Any:
        x0, cond = batch
        return SimpleNamespace(x0=x0, cond=cond)

    def step(self, engines: dict[str, Any], batch: Any, iteration: int, micro: int) -> dict[str, float]:
        return {**super().step(engines, batch, iteration, micro), "torch_threads": float(torch.get_num_threads())}

    def finish(self, engines: dict[str, Any], output_dir: str) -> dict[str, float]:
        return {}


def history_mean(client: Any, run_id: str) -> dict[str, float]:
    """Time-weighted means over steps after the warm-up: samples/s (total samples / total time) and stall."""
    speed = {m.step: m.value for m in client.get_metric_history(run_id, "samples_per_s") if m.step > WARMUP}
    stall = {m.step: m.value for m in client.get_metric_history(run_id, "data_stall_fraction") if m.step > WARMUP}
    if not speed:
        return {}
    step_time = {step: 1.0 / value for step, value in speed.items()}  # per sample; equal samples per step
    total = sum(step_time.values())
    return {
        "samples_per_s": len(speed) / total,
        "data_stall_fraction": sum(stall.get(step, 0.0) * step_time[step] for step in speed) / total,
        "steps": len(speed),
    }


def ray_fit(config: DistillConfig, workers: int, output: str, steps: int = STEPS) -> dict[str, float]:
    """`SyntheticStudent` through `fit` (ZeRO-2, `workers` Ray Train workers); numbers from MLflow."""
    import mlflow

    from pipelines import tracking
    from pipelines.trainer import fit

    trainer = dataclasses.replace(
        config.student.train, steps=steps, num_workers=workers, zero_stage=2, checkpoint_every=steps, max_failures=0
    )
    with tracking.start_run(f"bench_fit_{workers}w", tags={"benchmark": "train"}) as run:
        start = time.perf_counter()
        result = fit(SyntheticStudent, config, trainer, f"bench-fit-{workers}w", output, run.info.run_id, mlflow.get_tracking_uri())
        wall = time.perf_counter() - start
    if result.error is not None:
        raise result.error
    client = mlflow.tracking.MlflowClient()
    threads = client.get_metric_history(run.info.run_id, "torch_threads")
    return {
        **history_mean(client, run.info.run_id),
        "wall_s": wall,
        "threads": threads[-1].value if threads else 0,
        "load": os.getloadavg()[0],
    }


def overhead(config: DistillConfig, scratch: str) -> dict[str, dict[str, float]]:
    """Parts 1 and 2 in this process: the plain loop before and after the fit runs, so load from
    other jobs that changes during the run shows as a spread instead of skewing one side."""
    import ray

    from pipelines.ray_cluster import init_ray

    before = {threads: plain_loop(config, threads) for threads in (1, 2)}
    results = {}
    init_ray()
    try:
        for workers in (1, 2):
            results[f"fit_{workers}w"] = ray_fit(config, workers, scratch)
    finally:
        ray.shutdown()
    for threads in (1, 2):
        after = plain_loop(config, threads)
        first, second = before[threads]["samples_per_s"], after["samples_per_s"]
        results[f"plain_{threads}t"] = {
            "samples_per_s": 2 / (1 / first + 1 / second),  # same samples in each: total / total time
            "before": first,
            "after": second,
            "load": after["load"],
        }
    return results


def has_shards(data: str) -> bool:
    """Whether `data` holds shards, by the rule the stages read them with."""
    try:
        return bool(shard_urls(data))
    except FileNotFoundError:
        return False


def distill_command(data: str, output: str) -> list[str]:
    """`pipelines.distill` with every stage cut to STAGE_STEPS steps, one checkpoint each, no reward."""
    overrides = [f"data={data}", f"output={output}", "dmd.syncnet=", f"teacher.base.steps={STAGE_STEPS}"]
    overrides.append(f"teacher.base.checkpoint_every={STAGE_STEPS}")
    for section in ("teacher.train", "student.train", "dmd.train"):
        overrides += [f"{section}.steps={STAGE_STEPS}", f"{section}.checkpoint_every={STAGE_STEPS}"]
    return [sys.executable, "-m", "pipelines.distill", *overrides]


def per_stage(data: str, scratch: str, timeout: int = 600) -> dict[str, dict[str, float]]:
    """Part 3: run the real distill job on `data`, read each nested run's metric history."""
    import mlflow

    with subprocess.Popen(distill_command(data, os.path.join(scratch, "distill")), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as job:
        try:
            output, _ = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            job.send_signal(signal.SIGINT)  # the job's atexit ray.shutdown() stops the Ray it started
            job.communicate(timeout=120)
            raise
    if job.returncode != 0:
        raise RuntimeError(f"pipelines.distill exited with {job.returncode}:\n{output[-3000:]}")
    client = mlflow.tracking.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["lipforcing"], filter_string="tags.stage != ''", output_format="list")
    return {run.data.tags["stage"]: history_mean(client, run.info.run_id) for run in runs if run.data.tags.get("stage") in STAGES}


def noise_warning(*plain: dict[str, float]) -> list[str]:
    """A warning line when the plain loop's before/after runs differ by more than 25%."""
    spread = max(max(p["before"], p["after"]) / min(p["before"], p["after"]) for p in plain)
    if spread <= 1.25:
        return []
    return [
        f"**Noisy run:** the plain loop's before/after rates differ by up to {spread:.1f}x, so the load from "
        "other jobs changed during the run; read these ratios as indicative only. With 2 threads on 2 shared "
        "cores, torch's intra-op threads wait for each other whenever one is descheduled, so that row "
        "suffers most.",
        "",
    ]


def markdown(results: dict[str, dict[str, float]], stages: dict[str, dict[str, float]] | None, data: str, note: str) -> str:
    config = tiny_config()
    b = config.student.train.batch_size
    x0, _ = synthetic_batch(config, b)
    plain1, plain2, fit1, fit2 = (results[k] for k in ("plain_1t", "plain_2t", "fit_1w", "fit_2w"))
    lines = [
        HEADING,
        "",
        f"Machine: {machine()}. Torch threads: 1 per Ray worker (Ray's default for 1 CPU), 1 and 2 in the "
        f"plain loop. Command: `{COMMAND} --data {data}`. "
        "One run; ratios are between numbers measured side by side in it. Tiny profile, random weights: "
        "speed only, never quality. The machine is shared with other engineers' jobs, so absolute "
        "numbers are noisy; first 2 steps of every run left out; means are time-weighted "
        "(total samples / total step time).",
        "",
        f"### DeepSpeed + Ray Train vs a plain loop (student, LoRA rank {config.model.lora_rank}, "
        f"batch {b} x latents {list(x0.shape[1:])}, Diffusion Forcing loss, {STEPS} steps)",
        "",
        "The same model, fixed in-memory batch (no shards, no decode, no encoders), loss and AdamW settings; "
        "the fit runs use ZeRO-2 and log to MLflow, whose history gives their numbers (step time as "
        "the trainer measures it: batch fetch + step, without checkpoint and logging).",
        "",
        "| run | workers x threads | samples/s | data stall | wall s (incl. start-up) | load avg after |",
        "|---|---|---|---|---|---|",
        f"| plain PyTorch loop (before / after the fit runs) | 1 x 1 | {plain1['samples_per_s']:.2f} "
        f"({plain1['before']:.2f} / {plain1['after']:.2f}) | - | - | {plain1['load']:.1f} |",
        f"| plain PyTorch loop (before / after the fit runs) | 1 x 2 | {plain2['samples_per_s']:.2f} "
        f"({plain2['before']:.2f} / {plain2['after']:.2f}) | - | - | {plain2['load']:.1f} |",
        f"| `fit`, DeepSpeed ZeRO-2 + Ray Train | 1 x {fit1['threads']:.0f} | {fit1['samples_per_s']:.2f} | "
        f"{fit1['data_stall_fraction']:.1%} | {fit1['wall_s']:.0f} | {fit1['load']:.1f} |",
        f"| `fit`, DeepSpeed ZeRO-2 + Ray Train | 2 x {fit2['threads']:.0f} | {fit2['samples_per_s']:.2f} | "
        f"{fit2['data_stall_fraction']:.1%} | {fit2['wall_s']:.0f} | {fit2['load']:.1f} |",
        "",
        f"Ratios plain / DeepSpeed+Ray: **{plain1['samples_per_s'] / fit1['samples_per_s']:.2f}x** with one core "
        f"each (1 thread vs 1 worker), **{plain2['samples_per_s'] / fit2['samples_per_s']:.2f}x** for the whole "
        "2-core machine (2 threads vs 2 workers, global batch twice as large).",
        "",
        *noise_warning(plain1, plain2),
        f"### Per stage on real shards (`pipelines.distill`, {STAGE_STEPS} steps each, 2 workers, no SyncNet reward)",
        "",
    ]
    if stages is None:
        lines += [f"Skipped: {note}", ""]
        return "\n".join(lines)
    lines += [
        f"Shards: `{data}`. samples/s counts every worker's batch; data stall = share of step time spent "
        "waiting for the next batch (shard read + decode + windows; VAE/audio encoding is in the step).",
        "",
        "| stage | samples/s | data stall | steps averaged |",
        "|---|---|---|---|",
    ]
    for stage in STAGES:
        row = stages.get(stage)
        if row:
            lines.append(f"| {stage} | {row['samples_per_s']:.2f} | {row['data_stall_fraction']:.1%} | {row['steps']} |")
        else:
            lines.append(f"| {stage} | not logged | - | - |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the {HEADING!r} section of RESULTS.md")
    parser.add_argument("--data", default="outputs/data", help="shard folder (the data job's output) for part 3")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        config = tiny_config(args.data)
        results = overhead(config, scratch)
        stages, note, failed = None, "", False
        if not has_shards(args.data):
            note = f"no shards (*.tar) under `{args.data}` (run `make data` first, or pass --data)."
        else:
            try:
                stages = per_stage(args.data, scratch)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                note, failed = f"the distill job failed: {str(err).splitlines()[0]}", True
        if note:
            print(f"[bench_train] part 3 skipped: {note}", file=sys.stderr, flush=True)
    section = report(markdown(results, stages, args.data, note), HEADING, args.write)
    if failed:
        raise SystemExit(1)
    return section


if __name__ == "__main__":
    main()
