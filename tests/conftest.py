"""Shared fixtures: real services started on 127.0.0.1 for the tests that need them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "real"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


MLFLOW_PROCESS_STATE = ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(autouse=True)
def mlflow_process_state_restored() -> Iterator[None]:
    """Put MLflow's process-wide settings back after each test.

    `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into the environment (for child
    processes), and a `ResilientLogger` sets the HTTP retry variables for its process: without this,
    a test pointing MLflow at a server it then stops leaves every later job in the session (and the
    Ray workers it starts) talking to a dead port.
    """
    saved = {key: os.environ.get(key) for key in MLFLOW_PROCESS_STATE}
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # the URI follows the environment again
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API (moto's server) on 127.0.0.1; sets the AWS variables for this process.

    Yields the endpoint URL. Anything started after this (a local Ray, subprocesses) inherits the
    variables, so s3fs, boto3 and pyarrow all talk to it.
    """
    port = free_port()
    moto_server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    process = subprocess.Popen(
        [moto_server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    try:
        wait_for_port(port)
        os.environ.update(S3_ENV)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the local S3 server; yields `s3://<bucket>`."""
    import boto3

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:30] + "-" + uuid.uuid4().hex[:8]
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """One local Ray for the whole session, started after the S3 variables so workers see them."""
    import ray

    from pipelines.ray_cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_list(tmp_path_factory) -> str:
    """The embedded sample (good and deliberately bad clips), generated once; yields its list file."""
    from data_jobs.sample import generate_sample

    return generate_sample(str(tmp_path_factory.mktemp("sample")), seed=0)


@pytest.fixture(scope="session")
def sample_job(local_ray, sample_list, tmp_path_factory):
    """The sample through the real data job's ingest once (tiny profile): (output URL, summary).

    The data-job tests check this run; training tests (SyncNet, distillation, encode, eval) read its
    shards, as `make demo` does.
    """
    from data_jobs.config import DataJobConfig
    from data_jobs.job import run_data_job
    from pipelines.jobs import resolve_config

    output = str(tmp_path_factory.mktemp("data"))
    argv = ["profile=tiny", "execution.progress=false", f"input={sample_list}", f"output={output}", "write.inputs_per_task=3"]
    return output, run_data_job(resolve_config(DataJobConfig, argv))


@pytest.fixture(scope="session")
def sample_shards(sample_job) -> str:
    return sample_job[0]


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> Iterator[str]:
    """A SQLite MLflow store for the session's jobs (SyncNet, distill, eval share its registry)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session")
def trained_syncnet(sample_shards, mlflow_store, tmp_path_factory) -> str:
    """The SyncNet job on the sample shards (registers syncnet@champion); yields the checkpoint URL."""
    from lipforcing import storage
    from pipelines.jobs import resolve_config
    from pipelines.syncnet import SyncNetJobConfig
    from pipelines.syncnet import main as train_syncnet

    output = str(tmp_path_factory.mktemp("syncnet"))
    config = resolve_config(
        SyncNetJobConfig, [f"data={sample_shards}", f"output={output}", "train.steps=40", "train.checkpoint_every=20"]
    )
    assert train_syncnet(config) == 0
    return storage.join(output, "syncnet.pt")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The random order's seed even under -q, so a failing order can be replayed with
    `make test PYTEST_ARGS="--randomly-seed=<seed>"`."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"test order: --randomly-seed={seed}")


def kill_data_job_once(argv: list[str], markers: str, mlflow_db: str, timeout: float) -> int:
    """Start `python -m pipelines.data argv` in its own process group, SIGKILL it (the driver and
    the local Ray it started) as soon as a commit marker matches the `markers` glob, and return how
    many match once the kill has settled."""
    from lipforcing import storage

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.data", "execution.progress=false", *argv], cwd=REPO_ROOT, env=env,
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not storage.glob(markers):
            assert process.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, f"nothing matched {markers} within {timeout} s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # A worker process Ray started may outlive the group by a moment and still commit its task:
    # count once the markers stop changing.
    count, stable_since = len(storage.glob(markers)), time.monotonic()
    while time.monotonic() - stable_since < 3:
        time.sleep(0.5)
        if (now := len(storage.glob(markers))) != count:
            count, stable_since = now, time.monotonic()
    return count
