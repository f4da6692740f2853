"""The distilled student as an MLflow model, so that any MLflow user can run it:

    model = mlflow.pyfunc.load_model("models:/lipforcing-student@champion")
    model.predict(pd.DataFrame({"video": ["crop.mp4"], "audio": ["speech.wav"], "output": ["out.mp4"]}))

Each row: `video` is an aligned face-crop clip at 25 fps (what `make data` writes into its shards),
`audio` the speech to lip-sync it to (any file FFmpeg reads; empty: the video's own audio track),
`output` where the generated mp4 (with that audio) is written (a path or object-storage URL). The
student streams the clip chunk by chunk with its two-step schedule, as `make eval` runs it; the
clip's first frame is the reference. With `full_frame` true, `video` is any talking-head video and
the row runs `make infer`'s code (face tracking, the crop, paste-back into the frames). The
model names its run's weights file rather than holding a copy (`tracking.register_model`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
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
from pipelines import tracking

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "video"), ColSpec("string", "audio", required=False), ColSpec("string", "output"),
                   ColSpec("boolean", "full_frame", required=False)]),  # fmt: skip
    outputs=Schema([ColSpec("string", "output"), ColSpec("long", "frames"), ColSpec("double", "fps")]),
)
SETTINGS = ("profile", "model", "window", "decoder", "seed")  # the EvalConfig keys inference needs
TIMESTEPS_TAG = "student_timesteps"  # the version tag naming the timesteps the student was trained for


def read_crop_clip(video: str, audio: str) -> Clip:
    """A face-crop clip at 25 fps and the audio to pair with it (`audio` empty: its own track)."""
    from data_jobs.media import read_audio

    with contextlib.ExitStack() as stack:
        frames_path = stack.enter_context(storage.temporary_local(video))
        sound_path = stack.enter_context(storage.temporary_local(audio)) if audio else frames_path  # one download
        with open(frames_path, "rb") as handle:
            frames = decode_mp4(handle.read())
        return Clip(os.path.basename(video), frames, read_audio(sound_path, SAMPLE_RATE), SAMPLE_RATE, {})


class LipSyncStudent(mlflow.pyfunc.PythonModel):
    """Streaming inference of a registered student (see the module docstring)."""

    def load_context(self, context) -> None:
        from pipelines.evaluate import EvalConfig, Evaluator

        settings = {key: value for key, value in context.model_config.items() if key in SETTINGS}
        self.config = load_config(EvalConfig, lenient_files=[settings])
        weights = tracking.fetch_weights(context.model_config, tempfile.mkdtemp(prefix="lipforcing-student-"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.evaluator = Evaluator(self.config, weights, "", device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from data_jobs.media import encode_mp4, to_uint8
        from pipelines.evaluate import prepare_clip

        rows = []
        for row in model_input.to_dict("records"):
            if isinstance(row.get("full_frame"), bool | np.bool_) and row["full_frame"]:  # a missing cell is NaN
                rows.append(self.lipsync_video(row))
                continue
            clip = prepare_clip(read_crop_clip(row["video"], row.get("audio") or ""), self.config.window.size, self.evaluator.first_chunk_frames)
            if isinstance(clip, str):
                raise ValueError(f"{row['video']}: {clip}")
            generation = self.evaluator.generate(clip)
            video = encode_mp4(to_uint8(generation.frames).numpy(), FPS, crf=18, audio=clip.audio.numpy(), sample_rate=SAMPLE_RATE)
            storage.write_bytes(row["output"], video)
            rows.append({"output": row["output"], "frames": int(generation.frames.shape[0]), "fps": float(generation.fps)})
        return pd.DataFrame(rows, columns=["output", "frames", "fps"])


    def lipsync_video(self, row: dict[str, Any]) -> dict[str, Any]:
        """A whole video (`full_frame`): `make infer`'s code with this model's student and settings."""
        from pipelines.infer import InferConfig, lipsync

        settings = {key: getattr(self.config, key) for key in SETTINGS}
        config = InferConfig(video=row["video"], audio=row.get("audio") or "", output=row["output"], **settings)
        result = lipsync(config, self.evaluator)
        return {"output": row["output"], "frames": len(result.sources), "fps": float(result.student_fps)}


def log_student(run_id: str, weights_artifact: str, eval_settings: Any, name: str, tags: dict[str, str], alias: str | None = None) -> int:
    """Register the student whose weights run `run_id` logged as `weights_artifact`, configured for
    inference by `eval_settings` (an EvalConfig: model, window, decoder, seed); returns its version."""
    settings = {key: value for key, value in to_dict(eval_settings).items() if key in SETTINGS}
    tags = {**tags, TIMESTEPS_TAG: json.dumps(list(eval_settings.model.student_timesteps))}
    return tracking.register_model(run_id, weights_artifact, LipSyncStudent(), settings, SIGNATURE, name, tags, alias)


def sampling_timesteps(uri: str, configured: list[float]) -> list[float]:
    """The timesteps a student samples at: a registered version's own (it was trained for them, e.g.
    from an `make analyze` recipe), else `configured` (a path, or a version registered before the tag)."""
    if not uri.startswith("models:/"):
        return list(configured)
    recorded = tracking.find_version(uri, "student_weights").tags.get(TIMESTEPS_TAG)
    return json.loads(recorded) if recorded else list(configured)
