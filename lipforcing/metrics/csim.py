"""CSIM: how well a generated face keeps the identity of the source face.

As in the lip-sync papers: the cosine similarity between ArcFace embeddings of the source and the
generated face, averaged over frames. The embedding network is the recognition model of an
InsightFace model pack (buffalo_l's `w600k_r50.onnx`), never re-implemented or randomly
initialised: whichever `*.onnx` of the folder InsightFace's own router loads as ArcFace, run by
onnxruntime (on the CPU unless other providers are given).

Our crops are already aligned to a canonical 5-point template by the data job, so a crop is only
resized to the network's 112x112 input; no landmark alignment runs here. The template is looser
than ArcFace's, but source and generated crops share it, so the score compares identities.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np

BATCH = 64  # crops per call when the model takes a batch of any size


class IdentityEmbedder:
    """The ArcFace model of a local model-pack folder; `key` names the config key in errors."""

    def __init__(self, folder: str, key: str, providers: Sequence[str] = ("CPUExecutionProvider",)):
        from insightface.model_zoo import get_model
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        # buffalo_l's recognition model first: each file tried costs an onnxruntime session
        names = sorted((f for f in os.listdir(folder) if f.endswith(".onnx")), key=lambda f: (f != "w600k_r50.onnx", f))
        for name in names:
            model = get_model(os.path.join(folder, name), providers=list(providers))
            if isinstance(model, ArcFaceONNX):
                self.model = model
                batch = model.input_shape[0]
                self.batch = batch if isinstance(batch, int) and batch > 0 else BATCH
                return
        raise FileNotFoundError(
            f"config key '{key}': {folder} holds no ArcFace recognition model "
            "(an *.onnx with a square input of 112 px or more, like buffalo_l's w600k_r50.onnx)"
        )

    def embed(self, frames: np.ndarray) -> np.ndarray:
        """Unit-length embeddings [T, D] of uint8 RGB face crops [T, H, W, 3]."""
        width, height = self.model.input_size
        # InsightFace reads BGR; shrink with area averaging so a 512 px crop does not alias
        crops = [
            cv2.resize(
                frame,
                (width, height),
                interpolation=cv2.INTER_AREA if frame.shape[0] > height else cv2.INTER_LINEAR,
            )[:, :, ::-1]
            for frame in frames
        ]
        features = np.concatenate(
            [self.model.get_feat(crops[i : i + self.batch]) for i in range(0, len(crops), self.batch)]
        ).astype(np.float64)
        return features / np.linalg.norm(features, axis=1, keepdims=True)


def csim(embedder: IdentityEmbedder, source: np.ndarray, generated: np.ndarray) -> float:
    """Mean cosine similarity of frame pairs (uint8 RGB [T, H, W, 3] each); a single source frame
    (the reference) is compared with every generated frame."""
    if len(source) not in (1, len(generated)):
        raise ValueError(f"{len(source)} source frames for {len(generated)} generated frames")
    return float((embedder.embed(source) * embedder.embed(generated)).sum(axis=1).mean())
