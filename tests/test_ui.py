"""`make ui` opens where a training user looks: the experiment's runs table in MLflow 3's
model-training view, checked in a real headless Chromium (Debian's `chromium` package) against the
real MLflow UI that `python -m pipelines.ui` starts on a SQLite store."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import pytest

from pipelines import tracking
from tests.conftest import REPO_ROOT, free_port, wait_for_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)"),
]


def page_text(url: str, screenshot: str | None = None) -> str:
    """The page's visible text once its scripts have run (headless Chromium), optionally a screenshot."""
    flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--window-size=1500,1000", "--virtual-time-budget=30000"]  # fmt: skip
    if screenshot:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.fixture
def ui(tmp_path, monkeypatch):
    """`python -m pipelines.ui` on a fresh store holding one planted run; yields (address printed, run name)."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    name = f"planted-{uuid.uuid4().hex[:8]}"
    with tracking.start_run(name, tags={"job": "distill"}):
        for step in range(1, 4):
            mlflow.log_metric("loss", 1.0 / step, step=step)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines.ui", f"port={port}"], cwd=REPO_ROOT, env=os.environ.copy(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        announced = server.stdout.readline()
        wait_for_port(port, timeout=120)
        address = re.search(r"http://\S+", announced).group(0)
        deadline = time.monotonic() + 120  # the server answers its port before its app is ready
        while "Run Name" not in page_text(address) and time.monotonic() < deadline:
            time.sleep(2)
        yield address, name
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_make_ui_opens_on_the_runs_table_of_the_training_view(ui, tmp_path):
    address, name = ui
    assert address.endswith("/runs?workflowType=machine_learning")
    shown = page_text(address, screenshot=str(tmp_path / "runs.png"))
    assert name in shown and "Run Name" in shown  # the runs table, with the planted run
    assert "Evaluation runs" not in shown  # the GenAI view's split of runs is not what opened
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    # Control: the same experiment without the view's query opens MLflow 3's GenAI overview instead.
    plain = page_text(address.split("/runs?")[0])
    assert "Evaluation runs" in plain and name not in plain
