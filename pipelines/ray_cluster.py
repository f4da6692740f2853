"""Where a job runs: a local Ray started by the job, or a Ray cluster reached through the Jobs API.

- `RAY_ADDRESS` unset: `init_ray` starts a local Ray on 127.0.0.1 sized to the machine.
- `RAY_ADDRESS=http://head:8265` (the dashboard / Jobs API address, as for `ray job submit`):
  the command line submits itself as a Ray job with a runtime env (the working tree, the storage
  and MLflow variables) and streams the job's logs; inside that job `init_ray` joins the cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
LAST_JOB = REPO_ROOT / "outputs" / "last_job.json"  # the job `make status / logs / stop` act on

# A local single-node Ray: loopback only, no usage reporting, gloo over lo.
LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}

# Variables a submitted job needs to reach the same storage and tracking server. Credentials are
# forwarded only when the job config allows it (clusters usually carry their own).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_EXPERIMENT_NAME",
)
FORWARDED_SECRETS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
SUBMITTED_FLAG = "LIPFORCING_SUBMITTED"

log = logging.getLogger("lipforcing.cluster")


UPLOAD_EXCLUDES = [".venv/", ".git/", "outputs/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/"]


def in_submitted_job() -> bool:
    return os.environ.get(SUBMITTED_FLAG) == "1"


def should_submit() -> bool:
    """True on a user's machine pointed at a cluster; False inside the submitted job itself."""
    return bool(os.environ.get("RAY_ADDRESS")) and not in_submitted_job()


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster this job runs on, or start a local Ray sized to the machine."""
    if ray.is_initialized():
        return
    if in_submitted_job():
        ray.init(log_to_driver=True)
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for an accelerator and warn
    # With the dashboard Ray serves its State API, which Ray Train's placement-group cleaner polls
    # every few seconds: without it each poll fails ("Failed to query Ray Train Controller actor
    # state", between every training step) and a crashed run's GPUs would never be released.
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        _node_ip_address="127.0.0.1",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(),
        logging_level="WARNING",
        configure_logging=True,
    )


def ray_node() -> str:
    """The Ray node this process runs on ("" outside Ray): where a job's work really ran."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_on_worker(function: Callable[..., T], *args: Any) -> T:
    """Run `function(*args)` as a Ray task on a worker node and return its result: on a GPU when the
    cluster has one (the head of our manifests has no CPUs or GPUs for tasks, so it never runs there)."""
    init_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(function).options(num_gpus=1, num_cpus=1) if gpus else ray.remote(function).options(num_cpus=1)
    log.info("running %s on a %s worker", function.__name__, "GPU" if gpus else "CPU")
    return ray.get(task.remote(*args))


def _free_port() -> int:
    """A port nobody listens on now (8265 may belong to another local Ray or a cluster's tunnel)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def submit_job(
    module: str,
    argv: list[str],
    address: str | None = None,
    forward_credentials: bool = False,
    extra_env: dict[str, str] | None = None,
    wait: bool = True,
) -> int:
    """Submit `python -m module argv...` to the cluster's Jobs API; stream logs; return its exit code."""
    from ray.job_submission import JobStatus

    address = address or os.environ["RAY_ADDRESS"]
    names = FORWARDED_ENV + (FORWARDED_SECRETS if forward_credentials else ())
    env_vars = {name: os.environ[name] for name in names if name in os.environ}
    env_vars.update(extra_env or {})
    env_vars[SUBMITTED_FLAG] = "1"
    client = job_client(address)
    job_id = _submit_when_ready(
        client,
        entrypoint=shlex.join(["python", "-m", module, *argv]),
        submission_id=f"lipforcing-{module.rsplit('.', 1)[-1]}-{uuid.uuid4().hex[:8]}",
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars},
    )
    log.info("submitted Ray job %s to %s (make status / logs / stop)", job_id, address)
    LAST_JOB.parent.mkdir(parents=True, exist_ok=True)
    LAST_JOB.write_text(json.dumps({"job_id": job_id, "address": address}))
    if not wait:
        return 0
    asyncio.run(stream_logs(client, job_id))
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(0.5)
    log.info("Ray job %s: %s", job_id, status.value)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _submit_when_ready(client, timeout_s: float = 90.0, **job) -> str:
    """Submit, waiting out a head node that is up but whose job agent is not yet (a fresh cluster)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster accepted no job for {timeout_s:.0f} s: its head node's dashboard agent is "
                    "not serving. Check the head's logs/dashboard_agent.log; a common cause is its "
                    "listen port (--dashboard-agent-listen-port, default 52365) held by another Ray."
                ) from err
            time.sleep(2)


def _use_token_auth_when_available() -> None:
    """Ray 2.60 clusters require a token by default, but a client only sends one in token mode.

    Switch the client to token mode when a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) and RAY_AUTH_MODE is unset, as `ray.init` does for local clusters.
    """
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def job_client(address: str | None = None) -> Any:
    """A Jobs API client for `address` (default RAY_ADDRESS), with the cluster's token when one exists."""
    from ray.job_submission import JobSubmissionClient

    _use_token_auth_when_available()
    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS"))


async def stream_logs(client: Any, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()
