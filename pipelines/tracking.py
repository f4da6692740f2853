"""MLflow tracking: one place that picks the store, opens runs and logs configs.

`MLFLOW_TRACKING_URI` unset -> a SQLite store at `outputs/mlflow.db` with artifacts under
`outputs/mlartifacts` (what `make ui` opens); set -> that server. One parent run per job, nested
runs per stage. Keys that look like credentials are never logged.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml

from lipforcing.config import config_hash, flatten, to_dict

EXPERIMENT = "lipforcing"
DEFAULT_ROOT = Path("outputs")
_SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private)", re.IGNORECASE)
_MAX_PARAM_CHARS = 6000


def default_tracking_uri(root: Path = DEFAULT_ROOT) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def setup_tracking(root: Path = DEFAULT_ROOT, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; returns its id."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        root.mkdir(parents=True, exist_ok=True)
        uri = default_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # a file store: keep artifacts beside the database, not in ./mlruns
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(experiment, artifact_location=artifact_location)


@contextlib.contextmanager
def start_run(
    name: str,
    config: Any | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    experiment: str = EXPERIMENT,
    root: Path = DEFAULT_ROOT,
) -> Iterator[mlflow.ActiveRun]:
    """Open a run (nested under `parent_run_id` when given) and log `config` into it."""
    experiment_id = setup_tracking(root, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=name, experiment_id=experiment_id, tags=all_tags, nested=parent_run_id is not None) as run:
        if config is not None:
            log_config(config)
        yield run


def log_config(config: Any, hash_exclude: tuple[str, ...] = ()) -> str:
    """Log a resolved config as params, a `config.yaml` artifact and a `config_hash` tag."""
    digest = config_hash(config, exclude=hash_exclude)
    values = to_dict(config)
    mlflow.log_params(safe_params(values))
    mlflow.set_tag("config_hash", digest)
    mlflow.log_text(yaml.safe_dump(redact(values), sort_keys=False), "config.yaml")
    return digest


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with credential-like values replaced, for artifacts a team shares."""
    return {
        key: redact(value) if isinstance(value, Mapping) else ("***" if _SECRET.search(key) else value)
        for key, value in values.items()
    }


def safe_params(values: Mapping[str, Any]) -> dict[str, str]:
    """Flattened params with credential-like keys dropped and long values cut to MLflow's limit."""
    params = {}
    for key, value in flatten(values).items():
        if _SECRET.search(key):
            continue
        params[key] = str(value)[:_MAX_PARAM_CHARS]
    return params


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def register_artifact(name: str, run_id: str, artifact_path: str, alias: str | None = None) -> int:
    """Register a run's artifact (a checkpoint file or folder) as a new version of model `name`.

    Returns the version number; `alias` (e.g. "champion") is moved to it.
    """
    client = mlflow.tracking.MlflowClient()
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def registered_version(uri: str):
    """The model version behind `models:/name@alias` or `models:/name/version`."""
    if not uri.startswith("models:/"):
        raise ValueError(f"not a registered-model URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)")
    client = mlflow.tracking.MlflowClient()
    reference = uri.removeprefix("models:/")
    if "@" in reference:
        return client.get_model_version_by_alias(*reference.split("@", 1))
    return client.get_model_version(*reference.rsplit("/", 1))


def resolve_model(uri: str, destination: str | Path, key: str = "weights") -> tuple[str, str]:
    """(a location the caller can read, the registered version or ''), for a path or URL (returned as
    it is) or a registered model (`models:/name@alias`, `models:/name/version`). A registered model
    stored on a filesystem or object store is read in place; one behind the tracking server's artifact
    proxy is downloaded into `destination`. A missing model raises FileNotFoundError naming `key`."""
    from lipforcing import storage

    if not uri.startswith("models:/"):
        if not uri or not storage.exists(uri):
            raise FileNotFoundError(f"no weights at {uri!r} (config key '{key}')")
        return uri, ""
    try:
        version = registered_version(uri)
    except mlflow.exceptions.MlflowException as err:
        raise FileNotFoundError(f"{uri} is not in the MLflow registry (config key '{key}'): {err.message}") from None
    source = version.source
    if source.startswith("file://"):
        return source.removeprefix("file://"), str(version.version)
    if "://" in source and source.split("://", 1)[0] in ("s3", "gs", "gcs", "az", "abfs"):
        return source, str(version.version)
    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination)), str(version.version)
