"""The one training loop every stage uses: Ray Train `TorchTrainer` workers, DeepSpeed engines.

A stage (teacher LoRA, student Diffusion Forcing, DMD, SyncNet) subclasses `Stage` and says
which networks it trains, where its batches come from and what one micro-batch does. Everything
else lives here once: DeepSpeed setup (ZeRO stage, precision, AdamW, clipping), the learning-rate
schedule, gradient accumulation, checkpoints written by the engines and reported to Ray storage
(local or s3://), resume after a worker failure or a rerun, and MLflow logging from rank 0.

An ITERATION is one optimizer step of each network the stage updates in it, over the whole
effective batch (`batch_size * grad_accum * num_workers` samples): the loop feeds `grad_accum`
micro-batches, the engines accumulate their gradients and step once at the end. A profile states
`effective_batch`, the contract; the worker count comes from the run (the config or the cluster's
GPUs) and `grad_accum` is derived, so 4 or 64 GPUs train with the same dynamics. `steps`,
`warmup_steps`, `checkpoint_every`, `sample_every` and the learning-rate schedule all count
iterations, and the loop checks after every iteration that each engine stepped exactly as planned.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import torch

from lipforcing import storage
from lipforcing.config import ConfigError
from pipelines.deepspeed_setup import deepspeed_config, frozen_deepspeed_config, whole_modules

# Workers log rather than print: Ray Train tees a worker's print to its logger and to stdout, and
# the driver would show every line twice.
log = logging.getLogger("lipforcing.train")


@dataclass
class TrainerConfig:
    """How a stage trains; every stage section of a job config embeds one."""

    steps: int = 10  # iterations: optimizer steps over the whole effective batch
    batch_size: int = 1  # per worker, per micro-batch
    # samples per iteration over all workers; set, it derives grad_accum from the worker count
    # (0: batch_size * grad_accum * num_workers as given)
    effective_batch: int = 0
    grad_accum: int = 1  # micro-batches per worker in one iteration
    lr: float = 1e-5
    warmup_steps: int = 0  # iterations of linear warmup from 0 to lr
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 10.0
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    num_workers: int | None = 2  # None: one worker per GPU of the Ray cluster
    use_gpu: bool | None = None  # None: one GPU per worker when the Ray cluster has them
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 5
    # async: the loop goes on while Ray Train uploads the checkpoint (only the local write stalls it)
    checkpoint_upload: Literal["async", "sync"] = "async"
    sample_every: int = 0  # also render the stage's sample video every N iterations (0: at the end only)
    keep_checkpoints: int = 2
    log_every: int = 1
    max_failures: int = 2
    system_metrics_every_s: float = 10.0  # per-node CPU/memory/GPU into the run (0: off)
    seed: int = 0


class JobConfig(Protocol):
    """What the trainer needs of a job's config: its seed (stages read their own sections)."""

    seed: int


ConfigT = TypeVar("ConfigT", bound=JobConfig)


@dataclass
class WorkerContext(Generic[ConfigT]):
    """What a stage sees of the distributed run it executes in."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    config: ConfigT  # the whole job config, so stages read their own section
    trainer: TrainerConfig
    run_id: str | None
    tracking_uri: str | None

    def generator(self, iteration: int, micro: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
        """The random stream of one micro-batch on this rank, from the job's `seed`: reproducible on a
        rerun or a resume, different per rank and per micro-batch."""
        return torch.Generator(device).manual_seed(stream_seed(self.config.seed, iteration, micro, self.rank))

    def shared_choice(self, iteration: int, micro: int, count: int) -> int:
        """A pick in range(count) that every rank makes alike (no broadcast needed): layouts, exit steps."""
        generator = torch.Generator().manual_seed(stream_seed(self.config.seed, iteration, micro, rank=-1))
        return int(torch.randint(count, (1,), generator=generator))


def stream_seed(seed: int, iteration: int, micro: int, rank: int) -> int:
    """One seed per (run seed, iteration, micro-batch, rank); rank -1 is the stream all ranks share."""
    return ((seed * 1_000_003 + iteration) * 1_009 + micro) * 65_537 + rank + 1


class Stage(abc.ABC, Generic[ConfigT]):
    """One training stage. Instances are built on every worker from the job config."""

    name: str = "stage"
    # The networks `finish` and `render_samples` use (None: all). Only these are gathered whole
    # under ZeRO-3: at 14B a whole copy of every network would not fit on one GPU.
    whole_networks: tuple[str, ...] | None = None

    def __init__(self, context: WorkerContext[ConfigT]):
        self.context = context

    @abc.abstractmethod
    def networks(self) -> dict[str, torch.nn.Module]:
        """The trainable networks by name; each gets a DeepSpeed engine and an optimizer."""

    def frozen_networks(self) -> dict[str, torch.nn.Module]:
        """Networks used without training (the DMD teacher), placed like the trainable ones: cast to
        the training precision and, under ZeRO-3, partitioned across ranks by an optimizer-less engine."""
        return {}

    def updates(self, iteration: int, names: tuple[str, ...]) -> tuple[str, ...]:
        """The trainable networks (of `names`) that take an optimizer step in this iteration."""
        return names

    def trainable_parameters(self, name: str, module: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    def learning_rate(self, name: str) -> float:
        return self.context.trainer.lr

    def gradient_clipping(self, name: str) -> float:
        """Global gradient-norm clip of a network (0: none)."""
        return self.context.trainer.grad_clip

    @abc.abstractmethod
    def batches(self, start: int) -> Iterator[Any]:
        """An endless iterator of this rank's micro batches for iterations `start` onwards (a resumed
        run draws a fresh stream rather than replaying the first batches)."""

    def data_metrics(self) -> dict[str, float]:
        """What the loader reports per logged iteration (e.g. samples it skipped)."""
        return {}

    @abc.abstractmethod
    def step(self, engines: dict[str, Any], batch: Any, iteration: int, micro: int) -> dict[str, float]:
        """One micro-batch of an iteration: forward and `engine.backward(loss)` for each network in
        `updates(iteration)`. The loop calls `engine.step()`; the optimizer steps after the last micro-batch."""

    def end_iteration(self, engines: dict[str, Any], iteration: int) -> None:
        """After the iteration's optimizer steps (e.g. to follow the new weights with an EMA)."""
        return None

    def state(self) -> dict[str, Any]:
        """Extra state saved in checkpoints (EMA weights, counters)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` returned."""
        return None

    def whole(self, engines: dict[str, Any]) -> list[Any]:
        return [engine for name, engine in engines.items() if self.whole_networks is None or name in self.whole_networks]

    def render_samples(self, engines: dict[str, Any], output_dir: str, tag: str) -> None:
        """Rank 0 writes preview media under `output_dir/samples/` (uploaded to the stage's run).

        Called every `sample_every` iterations on every rank, with whole modules as in `finish`.
        """
        return None

    def finish(self, engines: dict[str, Any], output_dir: str) -> dict[str, float]:
        """After the last iteration, on every rank: export results into `output_dir` (rank 0 writes).

        The modules of `whole_networks` hold their full weights here, even under ZeRO-3.
        """
        return {}


def train_worker(loop_config: dict[str, Any]) -> None:
    """The function each Ray Train worker runs."""
    import deepspeed
    import ray.train

    stage_class: type[Stage] = loop_config["stage_class"]
    trainer_config: TrainerConfig = loop_config["trainer"]
    train_context = ray.train.get_context()
    rank, world = train_context.get_world_rank(), train_context.get_world_size()
    device = _device(trainer_config, train_context.get_local_rank())
    torch.manual_seed(trainer_config.seed + rank)
    context = WorkerContext(
        rank=rank,
        world_size=world,
        local_rank=train_context.get_local_rank(),
        device=device,
        config=loop_config["config"],
        trainer=trainer_config,
        run_id=loop_config.get("run_id"),
        tracking_uri=loop_config.get("tracking_uri"),
    )
    stage = stage_class(context)
    engines: dict[str, Any] = {}
    for name, module in stage.networks().items():
        if trainer_config.activation_checkpointing:
            checkpoint_blocks(module)
        ds_config = deepspeed_config(trainer_config, world, stage.learning_rate(name), stage.gradient_clipping(name))
        engine, *_ = deepspeed.initialize(
            model=module.to(device),
            model_parameters=stage.trainable_parameters(name, module),
            config=ds_config,
            dist_init_required=False,
        )
        engines[name] = engine
    trained = dict(engines)
    for name, module in stage.frozen_networks().items():
        engines[name] = _place_frozen(module, trainer_config, world, device)

    start, restored = _restore(trained, stage)
    logger = _RankZeroLogger(context) if rank == 0 else None
    if logger:
        logger.log(restored, start)
    node_metrics = _node_metrics(context) if context.local_rank == 0 else None
    try:
        _loop(stage, engines, trained, start, logger)
    finally:
        if node_metrics:
            node_metrics.stop()


def _loop(stage: Stage, engines: dict[str, Any], trained: dict[str, Any], start: int, logger: _RankZeroLogger | None) -> None:
    """Iterations `start`..`steps`, with logging, checkpoints and samples, then `finish`."""
    trainer_config = stage.context.trainer
    trainable = tuple(trained)
    batches = stage.batches(start)
    window = _Throughput()
    for iteration in range(start, trainer_config.steps):
        updated = stage.updates(iteration, trainable)
        metrics = _iteration(stage, engines, updated, batches, iteration, window)
        number = iteration + 1
        if logger and number % trainer_config.log_every == 0:
            logger.log({**metrics, **_engine_metrics(engines, trainable), **window.metrics(), **stage.data_metrics(), **_memory(stage.context.device)}, number)
        if number % trainer_config.checkpoint_every == 0 or number == trainer_config.steps:
            stall = _save_and_report(trained, stage, number, metrics)
            if logger:
                logger.log({"checkpoint_stall_s": stall}, number)
        if trainer_config.sample_every and number % trainer_config.sample_every == 0 and number < trainer_config.steps:
            with tempfile.TemporaryDirectory() as output_dir, whole_modules(stage.whole(trained)):
                stage.render_samples(engines, output_dir, f"{stage.name}-step{number:06d}")
                if logger:
                    logger.upload(output_dir)
    with tempfile.TemporaryDirectory() as output_dir, whole_modules(stage.whole(trained)):
        final = stage.finish(engines, output_dir)
        if logger:
            logger.log(final, trainer_config.steps)
            logger.upload(output_dir)
            logger.flush()


def _node_metrics(context: WorkerContext) -> Any:
    """System metrics of this worker's node into the stage's run (None without a run or when off)."""
    if not context.run_id or not context.trainer.system_metrics_every_s:
        return None
    import ray

    from pipelines.tracking import NodeMetrics

    node = f"{ray.util.get_node_ip_address()}-{ray.get_runtime_context().get_node_id()[:6]}"
    return NodeMetrics(context.run_id, context.tracking_uri, node, context.trainer.system_metrics_every_s)


def _iteration(
    stage: Stage, engines: dict[str, Any], updated: tuple[str, ...], batches: Iterator[Any], iteration: int, window: _Throughput
) -> dict[str, float]:
    """One optimizer step of each network in `updated`, over `grad_accum` micro-batches.

    The engines are told which micro-batch closes the accumulation, so the step cannot drift off the
    iteration (DeepSpeed's own counter would, for a network that skips iterations, like DMD's student).
    """
    config = stage.context.trainer
    for name in updated:
        lr = learning_rate_at(config, stage.learning_rate(name), iteration)
        for group in engines[name].optimizer.param_groups:
            group["lr"] = lr
    before = {name: engines[name].global_steps for name in updated}
    per_micro: list[dict[str, float]] = []
    waited = 0.0
    started = time.perf_counter()
    for micro in range(config.grad_accum):
        for name in updated:
            engines[name].set_gradient_accumulation_boundary(micro == config.grad_accum - 1)
        fetch = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - fetch
        per_micro.append(stage.step(engines, batch, iteration, micro))
        for name in updated:
            engines[name].step()
    window.add(waited, time.perf_counter() - started, config.batch_size * config.grad_accum * stage.context.world_size)
    stepped = {name: engines[name].global_steps - before[name] for name in updated}
    if any(count != 1 for count in stepped.values()):
        raise RuntimeError(f"[{stage.name}] iteration {iteration}: optimizer steps {stepped}, expected one each")
    stage.end_iteration(engines, iteration)
    metrics = {key: sum(m[key] for m in per_micro if key in m) / sum(key in m for m in per_micro) for key in per_micro[0]}
    metrics["micro_batches"] = float(config.grad_accum)
    return metrics


def learning_rate_at(config: TrainerConfig, base: float, iteration: int) -> float:
    """The learning rate of an iteration: linear warmup reaching `base` at iteration warmup_steps - 1,
    then constant, or cosine or linear decay reaching 0 at the last iteration. A function of the
    iteration alone, so a resume needs no scheduler state."""
    warmup = max(config.warmup_steps, 0)
    if iteration < warmup:
        return base * (iteration + 1) / warmup
    if config.schedule == "constant":
        return base
    progress = min((iteration - warmup + 1) / max(config.steps - warmup, 1), 1.0)
    if config.schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base * (1 - progress)


def _place_frozen(module: torch.nn.Module, config: TrainerConfig, world: int, device: torch.device) -> Any:
    """A frozen network in the training precision; under ZeRO-3 an optimizer-less engine that keeps
    only this rank's shard of every weight (gathered around each submodule's forward, like the
    trainable networks), so a 14B teacher costs 1/N of its bf16 size per GPU, not its whole fp32 size."""
    import deepspeed

    module.requires_grad_(False).eval()
    if config.zero_stage != 3:
        return module.to(device, torch.bfloat16 if config.precision == "bf16" else torch.float32)
    engine, *_ = deepspeed.initialize(model=module.to(device), config=frozen_deepspeed_config(config, world), dist_init_required=False)
    engine.eval()
    return engine


def _device(config: TrainerConfig, local_rank: int) -> torch.device:
    if config.use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def checkpoint_blocks(module: torch.nn.Module) -> None:
    """Recompute each transformer block in backward instead of keeping its activations."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    blocks = {type(b) for m in module.modules() if isinstance(getattr(m, "blocks", None), torch.nn.ModuleList) for b in m.blocks}
    if blocks:
        apply_activation_checkpointing(module, check_fn=lambda m: type(m) in blocks)


CHECKPOINT_FOLDER = "ray"  # under a job's output
CHECKPOINT_TAG = "state"
PROGRESS_FILE = "progress.json"


def _save_and_report(engines: dict[str, Any], stage: Stage, iteration: int, metrics: dict[str, float]) -> float:
    """Every rank writes its engine shards; Ray merges the ranks' files into one checkpoint and
    uploads it (in the background unless `checkpoint_upload` is sync). Returns the seconds the loop
    stood still for it."""
    import ray.train

    started = time.perf_counter()
    directory = tempfile.mkdtemp(prefix="lipforcing-checkpoint-")  # Ray deletes it once uploaded
    for name, engine in engines.items():
        client_state = {"iteration": iteration, "stage": stage.state()} if name == next(iter(engines)) else {}
        engine.save_checkpoint(os.path.join(directory, name), tag=CHECKPOINT_TAG, client_state=client_state)
    if stage.context.rank == 0:  # readable without unpickling anything: which iteration, at which world size
        progress = {
            "stage": stage.name,
            "iteration": iteration,
            "world_size": stage.context.world_size,
            "optimizer_steps": {n: e.global_steps for n, e in engines.items()},
        }
        with open(os.path.join(directory, PROGRESS_FILE), "w") as handle:
            json.dump(progress, handle)
    mode = ray.train.CheckpointUploadMode.ASYNC if stage.context.trainer.checkpoint_upload == "async" else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(
        {"iteration": iteration, **metrics},
        checkpoint=ray.train.Checkpoint.from_directory(directory),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )
    return time.perf_counter() - started


def _restore(engines: dict[str, Any], stage: Stage) -> tuple[int, dict[str, float]]:
    """Load the latest reported checkpoint, if any; returns the iteration to continue from and what
    the restore cost (seconds, files fetched).

    A rank fetches only its own share (the files every rank reads and its own ZeRO partitions); a
    checkpoint written at another world size is fetched whole and resharded (`pipelines.reshard`)."""
    import ray.train

    from pipelines.reshard import load_resharded

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    started, context = time.perf_counter(), stage.context
    with tempfile.TemporaryDirectory(prefix="lipforcing-restore-") as scratch:
        saved_world = json.loads(_read_checkpoint_file(checkpoint, PROGRESS_FILE)).get("world_size", context.world_size)
        directory, fetched = _fetch(checkpoint, scratch, context.rank if saved_world == context.world_size else None)
        for index, (name, engine) in enumerate(engines.items()):
            if saved_world == context.world_size:
                _, client_state = engine.load_checkpoint(os.path.join(directory, name), tag=CHECKPOINT_TAG)
            else:
                universal = os.path.join(scratch, "universal", name)  # never inside Ray's own checkpoint folder
                client_state = load_resharded(engine, os.path.join(directory, name), CHECKPOINT_TAG, universal)
            if index == 0:
                iteration = int(client_state["iteration"])
                stage.load_state(client_state.get("stage", {}))
    log.info("[%s] resumed from iteration %d (saved by %d workers, now %d)", stage.name, iteration, saved_world, context.world_size)
    return iteration, {"restore_s": time.perf_counter() - started, "restore_files": float(fetched), "restored_world_size": float(saved_world)}


RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank partition files


def _fetch(checkpoint: Any, scratch: str, rank: int | None) -> tuple[str, int]:
    """A local folder holding the checkpoint, or, for `rank`, only the files that rank loads (the
    checkpoint itself when it is already on this machine's disk), and how many files were copied."""
    import pyarrow.fs

    source, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if isinstance(source, pyarrow.fs.LocalFileSystem):
        return root, 0
    local, fetched = pyarrow.fs.LocalFileSystem(), 0
    for info in source.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        match = RANK_FILE.search(info.base_name)
        if rank is not None and match and int(match.group(1)) != rank:
            continue
        target = os.path.join(scratch, info.path[len(root) :].lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pyarrow.fs.copy_files(info.path, target, source_filesystem=source, destination_filesystem=local)
        fetched += 1
    return scratch, fetched


def _read_checkpoint_file(checkpoint: Any, name: str) -> str:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as handle:
        return handle.read().decode()


def _engine_metrics(engines: dict[str, Any], trainable: tuple[str, ...]) -> dict[str, float]:
    """Per trained network: learning rate, optimizer steps taken so far (restored on resume) and
    gradient norm; per network: the MiB of weights this rank holds (its shard under ZeRO-3)."""
    metrics = {f"resident_mb/{name}": resident_bytes(getattr(engine, "module", engine)) / 2**20 for name, engine in engines.items()}
    for name in trainable:
        engine = engines[name]
        metrics[f"lr/{name}"] = float(engine.get_lr()[0])
        metrics[f"optimizer_steps/{name}"] = float(engine.global_steps)
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics[f"grad_norm/{name}"] = float(norm)
    return metrics


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: ZeRO-3's partition where a parameter is partitioned."""
    total = 0
    for param in module.parameters():
        held = getattr(param, "ds_tensor", None)
        held = param.data if held is None or param.numel() > 0 else held  # a gathered parameter is whole
        total += held.numel() * held.element_size()
    return total


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import psutil

    return {"memory_gb": psutil.Process().memory_info().rss / 2**30}


class _Throughput:
    """Samples per second, iteration time and the share of it spent waiting for data, since the last read."""

    def __init__(self):
        self.wait = self.total = 0.0
        self.samples = self.steps = 0

    def add(self, wait: float, total: float, samples: int) -> None:
        self.wait += wait
        self.total += total
        self.samples += samples
        self.steps += 1

    def metrics(self) -> dict[str, float]:
        steps_time = max(self.total, 1e-9)
        result = {
            "samples_per_s": self.samples / steps_time,
            "data_stall_fraction": self.wait / steps_time,
            "iteration_time_s": steps_time / max(self.steps, 1),
        }
        self.wait = self.total = 0.0
        self.samples = self.steps = 0
        return result


class _RankZeroLogger:
    """Rank 0 writes metrics and artifacts into the stage's MLflow run opened by the driver, through
    a queue that outlives tracking-server outages (a hiccup never fails a step)."""

    def __init__(self, context: WorkerContext):
        from pipelines.tracking import ResilientLogger

        self.sink = ResilientLogger(context.run_id, context.tracking_uri) if context.run_id else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        if self.sink:
            self.sink.log_metrics(metrics, step)

    def upload(self, directory: str) -> None:
        if self.sink:
            self.sink.log_artifacts(directory)

    def flush(self) -> None:
        if self.sink:
            self.sink.flush()


def fit(
    stage_class: type[Stage],
    config: Any,
    trainer: TrainerConfig,
    run_name: str,
    output: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    section: str = "train",
) -> Any:
    """Run `stage_class` on Ray Train workers; returns Ray's `Result`. `section` names the trainer
    config in error messages (e.g. `dmd.train`).

    Checkpoints live under `<output>/ray/<run_name>` and nowhere else: a rerun with the same
    `run_name` and `output` continues from the latest one, and a worker that dies is restarted (up to
    `max_failures`) from it. Resuming unpickles DeepSpeed's files, so only a job's own output is ever
    read back (see the README, "Checkpoints and trust").
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Workers stay in the job's working directory, so relative local paths mean what they mean to
    # the user (Ray Train would otherwise move each worker into its run folder).
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    storage_path, filesystem = _ray_storage(storage.join(output, CHECKPOINT_FOLDER))
    trainer = placed(trainer, section)
    backend = "nccl" if trainer.use_gpu else "gloo"
    run = TorchTrainer(
        train_worker,
        train_loop_config={
            "stage_class": stage_class,
            "config": config,
            "trainer": trainer,
            "run_id": run_id,
            "tracking_uri": tracking_uri,
        },
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=trainer.num_workers,
            use_gpu=trainer.use_gpu,
            resources_per_worker={"CPU": trainer.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=trainer.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=trainer.keep_checkpoints),
        ),
    )
    return run.fit()


def placed(trainer: TrainerConfig, section: str = "train") -> TrainerConfig:
    """`trainer` as it will run on this Ray cluster: the worker count (None: one per GPU there),
    `use_gpu` (None: GPUs when there is one per worker) and `grad_accum` (from `effective_batch`).
    What the cluster cannot hold is refused with the keys to change: Ray Train would otherwise wait
    for the workers forever."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = total.get("GPU", 0.0), total.get("CPU", 0.0)
    workers = trainer.num_workers
    if workers is None:
        if not gpus or trainer.use_gpu is False:
            raise ConfigError(
                f"config key '{section}.num_workers' is unset, which means one worker per GPU, but the "
                f"{'run does not use GPUs' if trainer.use_gpu is False else 'Ray cluster has none'}: set it"
            )
        workers = int(gpus)
    use_gpu = trainer.use_gpu if trainer.use_gpu is not None else gpus >= workers
    if use_gpu and gpus < workers:
        raise ConfigError(
            f"config key '{section}.use_gpu' is true but the Ray cluster has {gpus:g} GPUs for "
            f"{workers} workers ('{section}.num_workers'): add GPU nodes (an autoscaling cluster: "
            f"start them first), lower num_workers, or set {section}.use_gpu=false"
        )
    needed = workers * trainer.cpus_per_worker
    if cpus < needed:
        raise ConfigError(
            f"'{section}.num_workers' x '{section}.cpus_per_worker' = {needed:g} CPUs but the Ray cluster has "
            f"{cpus:g}: add nodes or lower them"
        )
    return dataclasses.replace(trainer, num_workers=workers, use_gpu=use_gpu, grad_accum=accumulation(trainer, workers, section))


def accumulation(trainer: TrainerConfig, workers: int, section: str = "train") -> int:
    """Micro-batches per worker per iteration that make `effective_batch` on `workers` workers."""
    if not trainer.effective_batch:
        return trainer.grad_accum
    per_pass = trainer.batch_size * workers
    if trainer.effective_batch % per_pass:
        fits = [n for n in range(1, trainer.effective_batch // trainer.batch_size + 1) if trainer.effective_batch % (n * trainer.batch_size) == 0]
        raise ConfigError(
            f"config key '{section}.effective_batch' = {trainer.effective_batch} is not a multiple of "
            f"'{section}.batch_size' x workers = {trainer.batch_size} x {workers}; worker counts that fit: {fits}"
        )
    return trainer.effective_batch // per_pass


def _ray_storage(url: str) -> tuple[str, Any]:
    """Ray Train storage for a URL: local paths as they are, object stores through fsspec."""
    from lipforcing.storage import filesystem, is_local

    if is_local(url):
        return os.path.abspath(url), None
    import pyarrow.fs

    fs, path = filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
