"""The shape every command-line job shares: resolve the config, then run here or on the cluster.

    python -m pipelines.data profile=tiny input=s3://bucket/raw output=s3://bucket/shards

Arguments are dot-list overrides; `config=path.yaml` adds a YAML file (merged before the
overrides). The profile (`profile=tiny|1.3b|14b`) selects `pipelines/configs/<profile>.yaml`,
whose sections apply to every job that has them. The config is validated before any work, and
the same argument list is what a cluster submission runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lipforcing import storage
from lipforcing.config import ConfigError, load_config
from pipelines.ray_cluster import in_submitted_job, init_ray, should_submit, submit_job

# Config keys that name where a job reads and writes: on a cluster, every node must reach them.
LOCATION_KEYS = ("input", "output", "data", "latents", "root")

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROFILES = ("tiny", "1.3b", "14b")
DEFAULT_PROFILE = "tiny"


def resolve_config(schema: type[T], argv: Sequence[str]) -> T:
    """Schema defaults <- profile YAML <- `config=` files <- overrides."""
    overrides = [a for a in argv if not a.startswith("config=")]
    files = [a.split("=", 1)[1] for a in argv if a.startswith("config=")]
    profile = DEFAULT_PROFILE
    for item in overrides:
        if item.startswith("profile="):
            profile = item.split("=", 1)[1]
    if profile not in PROFILES:
        raise ConfigError(f"config key 'profile' is {profile!r}; allowed values: {', '.join(PROFILES)}")
    return load_config(profile_defaults(schema, profile), files=files, overrides=overrides, lenient_files=[CONFIG_DIR / f"{profile}.yaml"])


def profile_defaults(schema: type[T], profile: str) -> T:
    """A schema's defaults for `profile`: its own `for_profile` (a job with several models or
    profile-dependent data settings), else the profile set and its `model` section, when it has one,
    the profile's model config."""
    from lipforcing.models.config import model_config

    if hasattr(schema, "for_profile"):
        return schema.for_profile(profile)
    names = {field.name for field in dataclasses.fields(schema)}
    values = {"profile": profile} if "profile" in names else {}
    if "model" in names:
        values["model"] = model_config(profile)
    return schema(**values)


def check_shared_locations(config: Any) -> None:
    """On a multi-node cluster nodes share only object storage and the tracking server: refuse, before
    any work, a local path where a job reads or writes, and a tracking store on the head's disk."""
    import ray

    init_ray()
    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes < 2:
        return
    for key in LOCATION_KEYS:
        value = getattr(config, key, "")
        if value and storage.is_local(value):
            raise ConfigError(
                f"config key '{key}' is the local path {value!r}, but this Ray cluster has {nodes} nodes, which share "
                "only object storage: give an s3:// (or other object-store) URL"
            )
    tracked = hasattr(config, "output") or hasattr(config, "root")  # every job that writes something logs it to MLflow
    if tracked and not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI is {os.environ.get('MLFLOW_TRACKING_URI') or 'unset'}, a store on one node of a "
            f"{nodes}-node cluster: set it to your MLflow tracking server before submitting"
        )


def configure_logging() -> None:
    """Progress of every job goes through the `lipforcing` loggers to stdout, once per process
    (errors of the command line itself are printed to stderr)."""
    root = logging.getLogger("lipforcing")
    if not any(getattr(h, "lipforcing", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        handler.lipforcing = True
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def run_job(
    module: str,
    schema: type[T],
    main: Callable[[T], Any],
    argv: Sequence[str] | None = None,
    validate: Callable[[T], None] | None = None,
) -> int:
    """Entry point of `python -m <module>`: validate (the schema, then the job's own `validate` of
    values that depend on each other), then submit to `RAY_ADDRESS` or run locally."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    try:
        config = resolve_config(schema, argv)
        if validate is not None:
            validate(config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if should_submit():
        forward = bool(getattr(getattr(config, "cluster", None), "forward_credentials", False))
        return submit_job(module, argv, forward_credentials=forward)
    try:
        if in_submitted_job():
            check_shared_locations(config)
        result = main(config)
    except ConfigError as err:  # found while checking inputs or weights, before the work itself
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
