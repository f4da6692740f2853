"""Students and SyncNets as MLflow models: registered from their runs, loaded with
`mlflow.pyfunc.load_model` by alias, the student lip-syncs a clip to new audio and the SyncNet scores
a clip; loading their weights by path (`make eval`, the data job) keeps working. Tiny profile,
random-init weights: plumbing and shapes only, never a quality result."""

from __future__ import annotations

from pathlib import Path

import av
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from data_jobs.media import encode_wav, read_audio
from data_jobs.sample import ClipSpec, encode_clip
from lipforcing.data import SAMPLE_RATE
from lipforcing.models import build_student
from lipforcing.models.config import model_config
from lipforcing.models.syncnet import StableSyncNet, SyncNetConfig, load_syncnet, save_syncnet, score_clip
from pipelines import tracking
from pipelines.evaluate import EvalConfig
from pipelines.jobs import resolve_config
from pipelines.student_model import log_student, read_crop_clip
from pipelines.syncnet_model import log_syncnet

pytestmark = pytest.mark.integration


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """A tiny random student logged in a run, registered as lipforcing-student@candidate; yields its weights file."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    weights = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in build_student(model_config("tiny")).state_dict().items()}, str(weights))
    with tracking.start_run("dmd", tags={"stage": "dmd"}) as run:
        mlflow.log_artifact(str(weights))
    settings = resolve_config(EvalConfig, ["profile=tiny"])  # as a job resolves it: the tiny window is 64 px
    log_student(run.info.run_id, "dit.safetensors", settings, "lipforcing-student", {"lineage.data": "planted"}, "candidate")
    return weights


def test_the_registered_student_lip_syncs_a_whole_video_through_pyfunc(registered, tmp_path):
    """`full_frame`: a talking-head video (not a crop) goes through `make infer`'s code: tracked,
    cropped, generated, pasted back at the video's own size, with the new speech."""
    from data_jobs.media import probe_media

    video, _ = encode_clip(ClipSpec("talk", ("astronaut",), 25, 16000, 1, 3.0, (320, 320), "x", "x"), np.random.default_rng(2))
    (tmp_path / "talk.mp4").write_bytes(video)
    speech = np.sin(np.linspace(0, 3000, int(2.2 * SAMPLE_RATE))).astype(np.float32) * 0.3
    (tmp_path / "speech.wav").write_bytes(encode_wav(speech, SAMPLE_RATE))
    model = mlflow.pyfunc.load_model("models:/lipforcing-student@candidate")
    rows = pd.DataFrame({"video": [str(tmp_path / "talk.mp4")], "audio": [str(tmp_path / "speech.wav")],
                         "output": [str(tmp_path / "out.mp4")], "full_frame": [True]})  # fmt: skip
    result = model.predict(rows)
    frames = (int(2.2 * 25) - 1) // 4 * 4 + 1  # the speech's 4k+1 frames
    assert result["frames"].tolist() == [frames]
    info = probe_media(str(tmp_path / "out.mp4"))
    assert (info.width, info.height, info.audio_rate) == (320, 320, SAMPLE_RATE) and abs(info.duration_s - frames / 25) < 0.05


def crop_clip(tmp_path, seconds: float) -> tuple[str, int]:
    """A 25 fps face-crop clip of the sample's kind (64 px, as the tiny profile's window); its frame count."""
    video, _ = encode_clip(ClipSpec("crop", ("astronaut",), 25, 16000, 1, seconds, (64, 64), "x", "x"), np.random.default_rng(1))
    path = tmp_path / "crop.mp4"
    path.write_bytes(video)
    with av.open(str(path)) as container:
        return str(path), sum(1 for _ in container.decode(video=0))


def test_the_registered_student_lip_syncs_a_clip_through_pyfunc(registered, tmp_path):
    video, frames = crop_clip(tmp_path, 2.0)
    speech = np.sin(np.linspace(0, 2000, int(1.5 * SAMPLE_RATE))).astype(np.float32) * 0.3  # 1.5 s: shorter than the video
    (tmp_path / "speech.wav").write_bytes(encode_wav(speech, SAMPLE_RATE))
    model = mlflow.pyfunc.load_model("models:/lipforcing-student@candidate")
    request = pd.DataFrame({"video": [video], "audio": [str(tmp_path / "speech.wav")], "output": [str(tmp_path / "out.mp4")]})
    result = model.predict(request)
    # The longest 4k+1-frame cut under both the video and the new audio (1.5 s = 37.5 frames -> 37).
    expected = (min(frames, int(1.5 * 25)) - 1) // 4 * 4 + 1
    assert result.to_dict("records")[0]["frames"] == expected and result["output"][0] == str(tmp_path / "out.mp4")
    with av.open(str(tmp_path / "out.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert container.streams.audio, "the lip-synced clip carries the new audio"
    assert len(decoded) == expected and decoded[0].shape == (64, 64, 3)
    written = read_audio(str(tmp_path / "out.mp4"), SAMPLE_RATE)
    assert abs(len(written) - expected * SAMPLE_RATE / 25) < 0.1 * SAMPLE_RATE  # the speech, cut to the frames
    assert np.corrcoef(written[: len(written) // 2], speech[: len(written) // 2])[0, 1] > 0.9  # and it is that speech


def test_a_request_without_audio_uses_the_clips_own_and_a_short_clip_is_refused(registered, tmp_path):
    model = mlflow.pyfunc.load_model("models:/lipforcing-student@candidate")
    video, frames = crop_clip(tmp_path, 1.0)
    result = model.predict(pd.DataFrame({"video": [video], "audio": [""], "output": [str(tmp_path / "own.mp4")]}))
    assert result["frames"][0] == (frames - 1) // 4 * 4 + 1
    short = tmp_path / "short.wav"
    short.write_bytes(encode_wav(np.zeros(SAMPLE_RATE // 10, np.float32), SAMPLE_RATE))  # 0.1 s: under one chunk
    with pytest.raises(ValueError, match="first chunk alone needs"):
        model.predict(pd.DataFrame({"video": [video], "audio": [str(short)], "output": [str(tmp_path / "x.mp4")]}))


def test_loading_by_path_still_finds_the_weights_file(registered, tmp_path):
    """`make eval student_weights=models:/lipforcing-student@candidate` reads the weights file itself."""
    location, version = tracking.resolve_model("models:/lipforcing-student@candidate", tmp_path / "got", "student_weights")
    assert version == "1"
    assert open(location, "rb").read() == registered.read_bytes()
    tags = mlflow.tracking.MlflowClient().get_model_version("lipforcing-student", "1").tags
    assert tags["lineage.data"] == "planted"


def test_the_model_declares_its_columns_and_holds_no_copy_of_the_weights(registered, tmp_path):
    info = mlflow.models.get_model_info("models:/lipforcing-student@candidate")
    assert [c.name for c in info.signature.inputs.inputs] == ["video", "audio", "output", "full_frame"]
    assert [c.name for c in info.signature.outputs.inputs] == ["output", "frames", "fps"]
    folder = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "model"))
    held = [path.name for path in Path(folder).rglob("*") if path.is_file()]
    assert "MLmodel" in held and not [name for name in held if name.endswith(".safetensors")]


def test_the_registered_syncnet_scores_a_clip_as_the_library_does(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    checkpoint = tmp_path / "syncnet.pt"
    save_syncnet(StableSyncNet(SyncNetConfig()), str(checkpoint))
    with tracking.start_run("syncnet", tags={"job": "syncnet"}) as run:
        mlflow.log_artifact(str(checkpoint))
    log_syncnet(run.info.run_id, "syncnet.pt", "syncnet", {"lineage.data": "planted"}, alias="champion")
    video, _ = crop_clip(tmp_path, 2.0)
    scored = mlflow.pyfunc.load_model("models:/syncnet@champion").predict(pd.DataFrame({"video": [video], "audio": [""]}))
    clip = read_crop_clip(video, "")
    direct = score_clip(load_syncnet(SyncNetConfig(weights=str(checkpoint))), torch.from_numpy(clip.frames), clip.audio)
    assert scored.to_dict("records") == [{"offset": direct.offset, "confidence": pytest.approx(direct.confidence),
                                          "min_dist": pytest.approx(direct.min_dist)}]  # fmt: skip
    location, version = tracking.resolve_model("models:/syncnet@champion", tmp_path / "got", "score.syncnet")
    assert version == "1" and open(location, "rb").read() == checkpoint.read_bytes()  # the data job's path still works
