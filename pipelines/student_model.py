"""The distilled student as an MLflow model, so that any MLflow user can run it:

    model = mlflow.pyfunc.load_model("models:/lipforcing-student@champion")
    model.predict(pd.DataFrame({"video": ["crop.mp4"], "audio": ["speech.wav"], "output": ["out.mp4"]}))

Each row: `video` is an aligned face-crop clip at 25 fps (what `make data` writes into its shards),
`audio` the speech to lip-sync it to (any file FFmpeg reads; empty: the video's own audio track),
`output` where the generated mp4 (with that audio) is written (a path or object-storage URL). The
student streams the clip chunk by chunk with its two-step schedule, as `make eval` runs it; the
clip's first frame is the reference. Generated crops are not pasted back into full frames.

The model holds no copy of the weights: its config names the run artifact the distill job logged
(`runs:/<run>/dit.safetensors`), fetched when the model loads, so a 14B student is stored once. The
registered version carries the same location as its `weights` tag, which is what loading by path
(`student_weights=models:/...` in `make eval`) reads.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from lipforcing import storage
from lipforcing.config import load_config, to_dict
from lipforcing.data import FPS, SAMPLE_RATE
from lipforcing.data.shards import Clip, decode_mp4
from pipelines.tracking import WEIGHTS_TAG

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "video"), ColSpec("string", "audio", required=False), ColSpec("string", "output")]),
    outputs=Schema([ColSpec("string", "output"), ColSpec("long", "frames"), ColSpec("double", "fps")]),
)


class LipSyncStudent(mlflow.pyfunc.PythonModel):
    """Streaming inference of a registered student (see the module docstring)."""

    def load_context(self, context) -> None:
        from pipelines.evaluate import EvalConfig, Evaluator

        settings = dict(context.model_config)
        weights_uri = settings.pop(WEIGHTS_TAG)
        self.config = load_config(EvalConfig, lenient_files=[settings])
        self.scratch = tempfile.mkdtemp(prefix="lipforcing-student-")
        weights = mlflow.artifacts.download_artifacts(artifact_uri=weights_uri, dst_path=self.scratch)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.evaluator = Evaluator(self.config, weights, "", device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from data_jobs.media import encode_mp4, read_audio, to_uint8
        from pipelines.evaluate import prepare_clip

        rows = []
        for row in model_input.to_dict("records"):
            audio_source = row.get("audio") or row["video"]
            with storage.temporary_local(row["video"]) as video, storage.temporary_local(audio_source) as audio:
                frames = decode_mp4(open(video, "rb").read())
                sound = read_audio(audio, SAMPLE_RATE)
            clip = prepare_clip(Clip(os.path.basename(row["video"]), frames, sound, SAMPLE_RATE, {}),
                                self.config.window.size, self.evaluator.first_chunk_frames)  # fmt: skip
            if isinstance(clip, str):
                raise ValueError(f"{row['video']}: {clip}")
            generation = self.evaluator.generate(clip)
            video_bytes = encode_mp4(to_uint8(generation.frames).numpy(), FPS, crf=18, audio=clip.audio.numpy(), sample_rate=SAMPLE_RATE)
            storage.write_bytes(row["output"], video_bytes)
            rows.append({"output": row["output"], "frames": int(generation.frames.shape[0]), "fps": float(generation.fps)})
        return pd.DataFrame(rows, columns=["output", "frames", "fps"])


def log_student(run_id: str, weights_artifact: str, eval_settings: Any, name: str, tags: dict[str, str]) -> int:
    """Log the student in run `run_id` as an MLflow pyfunc model reading that run's `weights_artifact`
    (configured by `eval_settings`, an EvalConfig: model, window, decoder, seed), register it as a new
    version of `name` with `tags` plus its weights location; returns the version number."""
    client = mlflow.tracking.MlflowClient()
    weights_uri = f"runs:/{run_id}/{weights_artifact}"
    settings = {key: value for key, value in to_dict(eval_settings).items() if key in ("profile", "model", "window", "decoder", "seed")}
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), warnings.catch_warnings():
        # No input example on purpose: MLflow would load the model (the weights) and run the example
        # through it while logging. The signature states the columns instead.
        warnings.filterwarnings("ignore", "An input example was not provided", UserWarning)
        info = mlflow.pyfunc.log_model(
            name="student", python_model=LipSyncStudent(), model_config={**settings, WEIGHTS_TAG: weights_uri},
            signature=SIGNATURE, registered_model_name=name,
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        )  # fmt: skip
    version = str(info.registered_model_version)
    weights_location = f"{client.get_run(run_id).info.artifact_uri}/{weights_artifact}"
    for key, value in {**tags, WEIGHTS_TAG: weights_location}.items():
        client.set_model_version_tag(name, version, key, value)
    return int(version)
