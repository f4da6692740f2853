"""MLflow tracking: one place that picks the store, opens runs and logs configs.

`MLFLOW_TRACKING_URI` unset -> a SQLite store at `outputs/mlflow.db` with artifacts under
`outputs/mlartifacts` (what `make ui` opens); set -> that server. One parent run per job, nested
runs per stage. Keys that look like credentials are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion

from lipforcing.config import config_hash, flatten, to_dict

EXPERIMENT = "lipforcing"
# MLflow 3 files experiments as GenAI apps or model training; ours trains models.
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# On a registered version (an MLflow model: student, SyncNet): the location of its weights file.
WEIGHTS_TAG = "weights"
logger = logging.getLogger("lipforcing.tracking")
DEFAULT_ROOT = Path("outputs")
_SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key|private)", re.IGNORECASE)
_MAX_PARAM_CHARS = 6000


def default_tracking_uri(root: Path = DEFAULT_ROOT) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def setup_tracking(root: Path = DEFAULT_ROOT, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the configured store and make sure the experiment exists, as a model-training
    experiment (an older one gets the kind once); returns its id."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        root.mkdir(parents=True, exist_ok=True)
        uri = default_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(KIND_TAG) != TRAINING_KIND:
            mlflow.tracking.MlflowClient().set_experiment_tag(found.experiment_id, KIND_TAG, TRAINING_KIND)
        return found.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # a file store: keep artifacts beside the database, not in ./mlruns
        artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(experiment, artifact_location=artifact_location, tags={KIND_TAG: TRAINING_KIND})


def runs_page(base_url: str, experiment_id: str) -> str:
    """The UI page of an experiment's runs in MLflow 3's model-training view. The 3.x UI opens on its
    GenAI view (traces) unless told otherwise; the `workflowType` query switches it for this visit."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


@contextlib.contextmanager
def start_run(
    name: str,
    config: Any | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    experiment: str = EXPERIMENT,
    root: Path = DEFAULT_ROOT,
    resume_key: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open a run (nested under `parent_run_id` when given) and log `config` into it.

    With `resume_key` (e.g. where the run's checkpoints live), an unfinished run carrying the same
    key is reopened instead: a job rerun after a crash continues its curves in the same run."""
    experiment_id = setup_tracking(root, experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if resume_key:
        all_tags[RESUME_TAG] = resume_key
    previous = _unfinished_run(experiment_id, resume_key) if resume_key else None
    opened = (
        mlflow.start_run(run_id=previous, nested=parent_run_id is not None)
        if previous
        else mlflow.start_run(run_name=name, experiment_id=experiment_id, tags=all_tags, nested=parent_run_id is not None)
    )
    with opened as run:
        if previous:
            mlflow.set_tags({**all_tags, "resumed": "true"})  # params stay as first logged
        elif config is not None:
            log_config(config)
        yield run


RESUME_TAG = "lipforcing.resume_key"


def _unfinished_run(experiment_id: str, key: str) -> str | None:
    """The newest run of the experiment with this resume key that did not finish, if any."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], filter_string=f"tags.`{RESUME_TAG}` = '{key}'",
        order_by=["start_time DESC"], output_format="list", max_results=1,
    )  # fmt: skip
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


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


def register_model(run_id: str, weights_artifact: str, python_model: Any, settings: Mapping[str, Any],
                   signature: Any, name: str, tags: Mapping[str, str] | None = None, alias: str | None = None) -> int:  # fmt: skip
    """Log `python_model` (an `mlflow.pyfunc.PythonModel`) in run `run_id` and register it as a new
    version of `name`; returns the version number. The model holds no copy of the weights: its config
    (`settings` plus `weights`) names the run's `weights_artifact` as `runs:/<run>/<file>`, fetched when
    it loads, so a 14B checkpoint is stored once. The version carries `tags` and the weights file's
    location (`weights`), which loading by path (`resolve_model`) reads; `alias` is moved to it."""
    from mlflow import pyfunc

    client = mlflow.tracking.MlflowClient()
    requirements = [f"mlflow=={mlflow.__version__}"]
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), warnings.catch_warnings():
        # No input example on purpose: MLflow would load the model (the weights) and run the example
        # through it while logging. The signature states the columns instead.
        warnings.filterwarnings("ignore", "An input example was not provided", UserWarning)
        info = pyfunc.log_model(
            name=name, python_model=python_model, model_config={**settings, WEIGHTS_TAG: f"runs:/{run_id}/{weights_artifact}"},
            signature=signature, registered_model_name=name, pip_requirements=requirements,
        )  # fmt: skip
    version = str(info.registered_model_version)
    location = f"{client.get_run(run_id).info.artifact_uri}/{weights_artifact}"
    for key, value in {**(tags or {}), WEIGHTS_TAG: location}.items():
        client.set_model_version_tag(name, version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return int(version)


def fetch_weights(model_config: Mapping[str, Any], scratch: str) -> str:
    """Inside a loading model: a local copy of the weights file its config names."""
    return mlflow.artifacts.download_artifacts(artifact_uri=model_config[WEIGHTS_TAG], dst_path=scratch)


def registered_version(uri: str):
    """The model version behind `models:/name@alias` or `models:/name/version`."""
    if not uri.startswith("models:/"):
        raise ValueError(f"not a registered-model URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)")
    client = mlflow.tracking.MlflowClient()
    reference = uri.removeprefix("models:/")
    if "@" in reference:
        return client.get_model_version_by_alias(*reference.split("@", 1))
    return client.get_model_version(*reference.rsplit("/", 1))


def find_version(uri: str, key: str) -> ModelVersion:
    """`registered_version`, with a model missing from the registry as FileNotFoundError naming `key`
    (the config key a user changes), the way a missing file is reported."""
    try:
        return registered_version(uri)
    except mlflow.exceptions.MlflowException as err:
        raise FileNotFoundError(f"{uri} is not in the MLflow registry (config key '{key}'): {err.message}") from None


def resolve_model_for_workers(uri: str, output: str, key: str) -> str:
    """A location of `uri` (a path, URL or registered model) that every node of the job can read.

    A registered model is resolved here, on the driver, once; when that yields a file on this
    machine's disk (a local store, or a download from the tracking server's artifact proxy) while
    the job writes to object storage, it is copied under `<output>/models/` and that URL is handed
    to the workers: never a path that exists only where the driver runs."""
    from lipforcing import storage

    with tempfile.TemporaryDirectory(prefix="lipforcing-model-") as scratch:
        location, version = resolve_model(uri, scratch, key)
        if not storage.is_local(location):
            return location  # object storage: every node reads it in place
        if storage.is_local(output) and not location.startswith(scratch):
            return location  # a single machine: its own files are everyone's
        target = storage.join(output, "models", f"{_model_name(uri)}-v{version}" if version else "given", os.path.basename(location))
        if not storage.exists(target):
            storage.upload_file(location, target)
        return target


def _model_name(uri: str) -> str:
    return uri.removeprefix("models:/").split("@")[0].split("/")[0]


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
    version = find_version(uri, key)
    source = version.tags.get(WEIGHTS_TAG) or version.source  # a logged model names its weights file
    if source.startswith("file://"):
        return source.removeprefix("file://"), str(version.version)
    if "://" in source and source.split("://", 1)[0] in ("s3", "gs", "gcs", "az", "abfs"):
        return source, str(version.version)
    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination)), str(version.version)


class ResilientLogger:
    """Metrics and artifacts of a training run that survive a tracking-server outage.

    Training must never fail, nor burn a Ray Train restart, because MLflow is briefly unreachable:
    metrics queue up and are sent (in order, in batches) once the server answers again, with
    exponential backoff between attempts; artifact folders are copied aside and uploaded later.
    `flush` at the end retries for up to `timeout_s`, then gives up with a warning.
    """

    BATCH = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, run_id: str, tracking_uri: str | None, backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        from mlflow.tracking import MlflowClient

        # MLflow's own client retries a dead server for minutes inside one call, which would stall
        # the training step; this queue does the retrying, so each call may fail fast.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id, self.client = run_id, MlflowClient(tracking_uri=tracking_uri)
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.metrics: list[Any] = []
        self.artifacts: list[str] = []  # spooled copies waiting for upload
        self.failures = 0
        self.next_attempt = 0.0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.metrics.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
        self._send()

    def log_artifacts(self, directory: str) -> None:
        if os.listdir(directory):
            spool = tempfile.mkdtemp(prefix="lipforcing-artifacts-")
            shutil.copytree(directory, spool, dirs_exist_ok=True)
            self.artifacts.append(spool)
        self._send()

    def flush(self, timeout_s: float = 120.0) -> bool:
        """Send everything queued, retrying until `timeout_s`; True when nothing is left."""
        deadline = time.monotonic() + timeout_s
        while self.pending() and time.monotonic() < deadline:
            self.next_attempt = 0.0
            self._send()
            if self.pending():
                time.sleep(min(self.backoff_s * 2 ** min(self.failures, 6), self.max_backoff_s, max(deadline - time.monotonic(), 0)))
        if self.pending():
            logger.warning("MLflow unreachable: %d metrics and %d artifact folders of run %s not logged",
                           len(self.metrics), len(self.artifacts), self.run_id)  # fmt: skip
        return not self.pending()

    def pending(self) -> bool:
        return bool(self.metrics or self.artifacts)

    def _send(self) -> None:
        if not self.pending() or time.monotonic() < self.next_attempt:
            return
        try:
            while self.metrics:
                self.client.log_batch(self.run_id, metrics=self.metrics[: self.BATCH])
                del self.metrics[: self.BATCH]
            while self.artifacts:
                self.client.log_artifacts(self.run_id, self.artifacts[0])
                shutil.rmtree(self.artifacts.pop(0), ignore_errors=True)
        except Exception as err:  # any transport or server error: keep everything, try again later
            self.failures += 1
            delay = min(self.backoff_s * 2 ** (self.failures - 1), self.max_backoff_s)
            self.next_attempt = time.monotonic() + delay
            if self.failures == 1 or self.failures % 10 == 0:
                logger.warning("MLflow unreachable (%s: %s); %d metrics queued, retrying in %.0f s",
                               type(err).__name__, str(err)[:200], len(self.metrics), delay)  # fmt: skip
            return
        if self.failures:
            logger.info("MLflow reachable again after %d failed attempts; the queue is sent", self.failures)
        self.failures = 0


class NodeMetrics:
    """This node's CPU, memory, disk, network and (with NVML) GPU use, in a training run as
    `system/<node>/...` every `interval_s`: MLflow's own collectors, sent through a `ResilientLogger`
    so a tracking outage delays them instead of ending them (MLflow's monitor stops at the first
    failed request). One per node: the worker with local rank 0 runs it."""

    def __init__(self, run_id: str, tracking_uri: str | None, node: str, interval_s: float):
        import threading

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.collector = SystemMetricsMonitor(run_id, sampling_interval=interval_s, node_id=node, tracking_uri=tracking_uri)
        self.sink = ResilientLogger(run_id, tracking_uri)
        self.prefix, self.interval_s = f"system/{node}/", interval_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="node-metrics", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        step, last = 0, False
        while not last:
            last = self.stopped.wait(self.interval_s)  # a last sample when stopped: short runs get one too
            try:
                self.collector.collect_metrics()
                metrics = self.collector.aggregate_metrics()
                for monitor in self.collector.monitors:
                    monitor.clear_metrics()
            except Exception as err:  # noqa: BLE001 - a sensor that fails must not end training
                logger.warning("system metrics not collected: %s", err)
                continue
            self.sink.log_metrics({self.prefix + key: value for key, value in metrics.items()}, step)
            step += 1

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=self.interval_s + 5)
        self.sink.flush(timeout_s=30)
