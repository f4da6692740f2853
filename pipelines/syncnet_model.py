"""A trained SyncNet as an MLflow model: `mlflow.pyfunc.load_model("models:/syncnet@champion")`
scores how well a face-crop clip's lips match its audio, as the data filter and `make eval` do:

    model.predict(pd.DataFrame({"video": ["crop.mp4"], "audio": ["speech.wav"]}))
    -> offset (frames; audio leads video when positive), confidence (Sync-C), min_dist (Sync-D)

`video` is an aligned face-crop clip at 25 fps, `audio` any file FFmpeg reads (empty: the video's
own track). The model names its run's checkpoint rather than holding a copy (`tracking.register_model`).
"""

from __future__ import annotations

import tempfile
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from lipforcing.models.syncnet import SyncNetConfig, load_syncnet, score_clip
from pipelines import tracking
from pipelines.student_model import read_crop_clip

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "video"), ColSpec("string", "audio", required=False)]),
    outputs=Schema([ColSpec("long", "offset"), ColSpec("double", "confidence"), ColSpec("double", "min_dist")]),
)


class SyncScorer(mlflow.pyfunc.PythonModel):
    """AV offset, Sync-C and Sync-D of face-crop clips (see the module docstring)."""

    def load_context(self, context) -> None:
        weights = tracking.fetch_weights(context.model_config, tempfile.mkdtemp(prefix="lipforcing-syncnet-"))
        self.model = load_syncnet(SyncNetConfig(weights=weights), key="syncnet")

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        rows = []
        for row in model_input.to_dict("records"):
            clip = read_crop_clip(row["video"], row.get("audio") or "")
            result = score_clip(self.model, torch.from_numpy(clip.frames), clip.audio)
            rows.append({"offset": int(result.offset), "confidence": float(result.confidence), "min_dist": float(result.min_dist)})
        return pd.DataFrame(rows, columns=["offset", "confidence", "min_dist"])


def log_syncnet(run_id: str, checkpoint_artifact: str, name: str, tags: dict[str, str], alias: str | None = None) -> int:
    """Register the SyncNet checkpoint run `run_id` logged as `checkpoint_artifact`; returns its version."""
    return tracking.register_model(run_id, checkpoint_artifact, SyncScorer(), {}, SIGNATURE, name, tags, alias)
