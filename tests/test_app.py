"""`make app` in a real headless Chromium driven through chromedriver (Debian's `chromium` and
`chromium-driver`): upload a video and a speech file, pick the registered student, and the browser
plays a result as long as the speech. Tiny random-init student: plumbing, never a quality result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import mlflow
import numpy as np
import pytest
from safetensors.torch import save_file

from data_jobs.media import encode_wav
from data_jobs.sample import ClipSpec, encode_clip
from lipforcing.data import SAMPLE_RATE
from lipforcing.models import build_student
from lipforcing.models.config import model_config
from pipelines import tracking
from pipelines.evaluate import EvalConfig
from pipelines.jobs import resolve_config
from pipelines.student_model import log_student
from tests.conftest import REPO_ROOT, free_port, wait_for_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason="no Chromium / chromedriver here (apt-get install chromium chromium-driver)"),
]


@pytest.fixture
def app(tmp_path, monkeypatch):
    """The app on a fresh store holding one registered tiny student (@candidate); yields its address."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    weights = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in build_student(model_config("tiny")).state_dict().items()}, str(weights))
    with tracking.start_run("dmd", tags={"stage": "dmd"}) as run:
        mlflow.log_artifact(str(weights))
    log_student(run.info.run_id, "dit.safetensors", resolve_config(EvalConfig, ["profile=tiny"]), "lipforcing-student", {}, "candidate")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipelines.app", f"port={port}", f"output={tmp_path}/app"], cwd=REPO_ROOT,
                              env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_for_port(port, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_upload_choose_a_version_and_watch_the_result(app, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    video, _ = encode_clip(ClipSpec("talk", ("astronaut",), 25, 16000, 1, 3.0, (320, 320), "x", "x"), np.random.default_rng(3))
    (tmp_path / "talk.mp4").write_bytes(video)
    seconds = 2.2
    speech = np.sin(np.linspace(0, 3000, int(seconds * SAMPLE_RATE))).astype(np.float32) * 0.3
    (tmp_path / "speech.wav").write_bytes(encode_wav(speech, SAMPLE_RATE))

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        browser.get(app)
        choices = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#version option")]
        assert choices == ["version 1 (@candidate)"]
        browser.find_element(By.ID, "video").send_keys(str(tmp_path / "talk.mp4"))
        browser.find_element(By.ID, "audio").send_keys(str(tmp_path / "speech.wav"))
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 600).until(lambda b: b.find_elements(By.ID, "result") or b.find_elements(By.ID, "error"))
        assert not browser.find_elements(By.ID, "error"), browser.find_element(By.ID, "error").text
        assert "models:/lipforcing-student/1" in browser.find_element(By.ID, "about").text
        # the browser itself loads the mp4: its duration is the speech's 4k+1 frames at 25 fps
        script = "const v = document.getElementById('result'); return v.error ? 'error ' + v.error.code : (v.readyState >= 1 ? v.duration : null);"
        duration = WebDriverWait(browser, 120).until(lambda b: b.execute_script(script))
        frames = (int(seconds * 25) - 1) // 4 * 4 + 1
        assert duration == pytest.approx(frames / 25, abs=0.1), duration
    finally:
        browser.quit()

