"""Ray: a real head node started on 127.0.0.1 and jobs submitted through the Jobs API."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on loopback ports of its own; yields the Jobs API address.

    The dashboard agent gets a free port too: its default (52365) is already held by the
    session's local Ray, and a head whose agent cannot bind accepts no jobs ("No available agent").
    """
    gcs_port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir = tmp_path_factory.mktemp("ray")
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={agent_port}", "--num-cpus=2",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        stop_cluster(temp_dir)


def stop_cluster(temp_dir) -> None:
    """Stop only this head node (its processes name its temp dir): `ray stop` would also end the
    session's local Ray and any other Ray on the machine."""
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    mine = [
        p for p in psutil.process_iter(["cmdline"])
        if p.pid not in spared and any(str(temp_dir) in part for part in p.info["cmdline"] or [])
    ]  # fmt: skip
    for process in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(mine, timeout=30)


def _submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """Run a job command line the way a user does, with RAY_ADDRESS pointing at the cluster."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cluster_check", *args],
        env={**env, "RAY_ADDRESS": address},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_job_is_submitted_runs_on_the_cluster_and_streams_logs(ray_head):
    address, env = ray_head
    done = _submit(address, env, "expect_nodes=1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted Ray job lipforcing-cluster_check-" in done.stdout
    assert "submitted job: True" in done.stdout  # ran inside the cluster, not locally
    assert "imports ok" in done.stdout  # the uploaded working dir is importable there
    assert ": SUCCEEDED" in done.stdout


def test_failing_job_reports_failure(ray_head):
    address, env = ray_head
    done = _submit(address, env, "expect_nodes=3")
    assert done.returncode == 1
    assert "cluster check: FAILED" in done.stdout
    assert ": FAILED" in done.stdout


def test_config_error_stops_before_submission(ray_head):
    address, env = ray_head
    done = _submit(address, env, "expect_nodez=1")
    assert done.returncode == 2
    assert "unknown config key 'expect_nodez'" in done.stderr
    assert "submitted Ray job" not in done.stdout


def test_the_local_ray_serves_the_state_api(local_ray):
    """Ray Train's placement-group cleaner polls the State API; without the dashboard every poll
    failed ("Failed to query Ray Train Controller actor state") and a dead run's resources leaked."""
    import ray
    from ray.util.state import list_nodes

    assert [node.state for node in list_nodes(address=ray.get_runtime_context().gcs_address)] == ["ALIVE"]
