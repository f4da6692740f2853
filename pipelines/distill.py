"""`make distill`: teacher -> student -> DMD on Ray Train + DeepSpeed, one MLflow parent run.

Each stage is a nested MLflow run (`teacher`, `student`, `dmd`) and a Ray Train run named
`<run_name>-<stage>` whose checkpoints live under `<output>/ray`; rerunning after a crash continues
each stage from its latest checkpoint, and a stage whose weights already exist in `<output>/<stage>/`
is skipped unless `force=true`. The DMD stage registers the student as `lipforcing-student`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import mlflow

from lipforcing import storage
from lipforcing.config import ConfigError, to_yaml
from lipforcing.data.shards import RAW_FIELDS, check_readable
from pipelines import lineage, tracking
from pipelines.distill_config import STAGES, DistillConfig
from pipelines.jobs import profile_defaults, run_job
from pipelines.ray_cluster import init_ray
from pipelines.stages.common import WEIGHTS_FILE, given_weights, stage_weights
from pipelines.trainer import CHECKPOINT_FOLDER, TrainerConfig, accumulation, fit, placed

TRAINED = ("teacher_base", "teacher", "student", "dmd")

log = logging.getLogger("lipforcing.distill")


def validate(config: DistillConfig, check_data: bool = True) -> None:
    """Values that depend on each other, the weights a profile needs and (`check_data`) the data to read."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"config key 'stages' has {unknown}; allowed values: {', '.join(STAGES)}")
    if config.dmd.ema and config.dmd.ema_start_step < 1:
        raise ConfigError(
            f"config key 'dmd.ema_start_step' is {config.dmd.ema_start_step}; allowed values: an iteration >= 1 "
            "(an EMA from the first step keeps the pre-DMD student in the export)"
        )
    for key, values in (("student.noise_levels", config.student.noise_levels), ("dmd.timestep_bounds", config.dmd.timestep_bounds)):
        if not values or any(not 0.0 <= v <= 1.0 for v in values):
            raise ConfigError(f"config key '{key}' is {values}; allowed values: flow times in [0, 1]")
    missing = config.missing_pretrained_weights()
    if missing:
        raise ConfigError(
            f"config keys {', '.join(missing)} are empty: the {config.model.profile} profile trains from "
            "pretrained weights (local paths or URLs); set them, or allow_random_init=true for a smoke test"
        )
    for section, trainer in trainers(config).items():
        if trainer.num_workers is not None:  # else the cluster's GPU count decides, checked at launch
            accumulation(trainer, trainer.num_workers, section)
    if not check_data:
        return
    if config.latents:
        check_readable(config.latents, ("pth",), "latents")
    else:
        check_readable(config.data, RAW_FIELDS, "data")


def trainers(config: DistillConfig) -> dict[str, TrainerConfig]:
    """The trainer config of every stage this run trains, by config key."""
    sections = {"teacher.base": config.teacher.base, "teacher.train": config.teacher.train}
    sections.update({"student.train": config.student.train, "dmd.train": config.dmd.train})
    return {key: trainer for key, trainer in sections.items() if key.split(".")[0] in config.stages}


def resolve_models(config: DistillConfig) -> None:
    """Turn registered models (`models:/...`) the stages read into locations every worker can read
    (on a cluster: an object-storage URL, never a file on the driver's disk)."""
    if config.teacher.weights:
        config.teacher.weights = tracking.resolve_model_for_workers(config.teacher.weights, config.output, "teacher.weights")
    if config.student.weights:
        config.student.weights = tracking.resolve_model_for_workers(config.student.weights, config.output, "student.weights")
    if "dmd" in config.stages and config.dmd.syncnet:
        config.dmd.syncnet = tracking.resolve_model_for_workers(config.dmd.syncnet, config.output, "dmd.syncnet")


def run_stage(stage_class, config: DistillConfig, trainer: TrainerConfig, name: str, parent_id: str) -> None:
    run_name = f"{config.run_name}-{name}"
    checkpoints = storage.join(config.output, CHECKPOINT_FOLDER, run_name)
    section = "teacher.base" if name == "teacher_base" else f"{name}.train"
    trainer = placed(trainer, section)  # worker count, GPUs and accumulation as this cluster runs them
    with tracking.start_run(name, parent_run_id=parent_id, tags={"stage": name, "ray_run": run_name}, resume_key=checkpoints) as run:
        if mlflow.get_run(run.info.run_id).data.tags.get("resumed") != "true":  # a new run: record its settings
            mlflow.log_params({f"train.{k}": v for k, v in tracking.safe_params(trainer.__dict__).items()})
        result = fit(stage_class, config, trainer, run_name, config.output, run.info.run_id, mlflow.get_tracking_uri(), section)
        if result.error is not None:
            raise result.error


def distill(config: DistillConfig) -> int:
    run_distill(config)
    return 0


def run_distill(config: DistillConfig) -> int | None:
    """The job; returns the student version it registered (None when DMD did not run here)."""
    from pipelines.stages.dmd import DistributionMatching
    from pipelines.stages.student import StudentDiffusionForcing
    from pipelines.stages.teacher import TeacherBase, TeacherLora

    validate(config)
    init_ray()
    storage.write_text(storage.join(config.output, "config.yaml"), to_yaml(config))
    resume = f"distill:{storage.join(config.output, config.run_name)}"
    registered = None
    with tracking.start_run("distill", config=config, tags={"job": "distill"}, resume_key=resume) as parent:
        parent_id = parent.info.run_id
        trained_on = log_lineage(config)
        resolve_models(config)
        for stage in config.stages:
            done = storage.exists(stage_weights(config.output, stage))
            if given_weights(config, stage):
                log.info("%s: using %s", stage, given_weights(config, stage))
                continue
            if done and not config.force:
                log.info("%s: output exists at %s, skipped (force=true reruns)", stage, stage_weights(config.output, stage))
                with tracking.start_run(stage, parent_run_id=parent_id, tags={"stage": stage, "skipped": "true"}):
                    pass
                continue
            if stage == "teacher":
                if config.teacher.base.steps > 0:
                    mlflow.log_param("teacher.base_init", "random init, trained in full before LoRA (no pretrained base)")
                    run_stage(TeacherBase, config, config.teacher.base, "teacher_base", parent_id)
                run_stage(TeacherLora, config, config.teacher.train, "teacher", parent_id)
            elif stage == "student":
                run_stage(StudentDiffusionForcing, config, config.student.train, "student", parent_id)
            else:
                run_stage(DistributionMatching, config, config.dmd.train, "dmd", parent_id)
                registered = register_student(config, parent_id, trained_on)
    return registered


def log_lineage(config: DistillConfig) -> dict[str, str]:
    """Record in the active (job) run what it learns from: the dataset it reads (context "training")
    and the models it starts from or uses (`upstream.*`: the teacher, given or trained here, a given
    student, the reward's SyncNet), pinning a registered one to the version recorded, which the job
    then uses. Returns the tags a registered student carries for it."""
    trained_on = lineage.data_lineage(config.data)
    lineage.log_dataset(trained_on, "training")
    upstream = {}
    for role, key in (("teacher", "teacher.weights"), ("student", "student.weights")):
        if given_weights(config, role):
            tags, pinned = lineage.log_upstream(role, storage.absolute(given_weights(config, role)), key)
            getattr(config, role).weights = pinned
            upstream.update(tags)
    if "dmd" in config.stages and not config.teacher.weights:  # the teacher trained here: a later run can reuse it
        upstream.update(lineage.log_upstream("teacher", storage.absolute(stage_weights(config.output, "teacher")), "teacher.weights")[0])
    if "dmd" in config.stages and config.dmd.syncnet:
        tags, config.dmd.syncnet = lineage.log_upstream("syncnet", config.dmd.syncnet, "dmd.syncnet")
        upstream.update(tags)
    return {**trained_on.tags(), **upstream}


def register_student(config: DistillConfig, parent_id: str, trained_on: dict[str, str]) -> int:
    """Register the DMD run's exported student as `lipforcing-student` under `dmd.registered_alias`,
    tagged with the lineage of its training data and the upstream models (`trained_on`); returns
    the version."""
    from pipelines.evaluate import EvalConfig
    from pipelines.student_model import log_student

    runs = mlflow.search_runs(
        experiment_names=[tracking.EXPERIMENT],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.stage = 'dmd'",
        output_format="list",
    )
    name, alias = config.dmd.registered_name, config.dmd.registered_alias
    inference = dataclasses.replace(profile_defaults(EvalConfig, config.profile), model=config.model, window=config.window, seed=config.seed)
    version = log_student(runs[0].info.run_id, WEIGHTS_FILE, inference, name, trained_on, alias)
    log.info("registered models:/%s/%s%s: mlflow.pyfunc.load_model lip-syncs with it", name, version, f" (@{alias})" if alias else "")
    return version


if __name__ == "__main__":
    sys.exit(run_job("pipelines.distill", DistillConfig, distill, validate=validate))
