"""Transform 5: warp every frame so the smoothed landmarks land on a canonical 5-point template
(each frame is warped once, from the single decode, in `data_jobs/ingest.py`).

The per-frame 2x3 affine (source pixels -> crop pixels) is kept with the sample: inference pastes
generated crops back into the original frames with its inverse.
"""

from __future__ import annotations

import cv2
import numpy as np

from data_jobs.config import AlignConfig
from data_jobs.pipeline import Transform

# InsightFace's ArcFace template (112x112 crop), normalised to [0, 1]: left eye, right eye, nose tip,
# left and right mouth corners.
ARCFACE = (
    np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
    )
    / 112.0
)
# Lip-sync crops need the chin, jaw and some context: shrink the layout about the centre by 0.7 and
# raise it a little so the mouth sits below the middle with room for the chin.
LOOSE = (ARCFACE - 0.5) * 0.7 + np.array([0.5, 0.47])
TEMPLATES = {"arcface": ARCFACE, "loose": LOOSE}


def template_points(name: str, size: int) -> np.ndarray:
    return TEMPLATES[name] * size


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping `source` points onto `target`
    (Umeyama 1991 without reflection). In 2-D that is complex least squares: with centred points
    as complex numbers, target ~ a * source for the one complex factor a (scale and angle), in
    closed form, a tenth of the SVD's cost per frame. Returns the 2x3 matrix."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    x = (source[:, 0] - source_mean[0]) + 1j * (source[:, 1] - source_mean[1])
    y = (target[:, 0] - target_mean[0]) + 1j * (target[:, 1] - target_mean[1])
    a = np.vdot(x, y) / np.vdot(x, x).real
    linear = np.array([[a.real, -a.imag], [a.imag, a.real]])
    return np.hstack([linear, (target_mean - linear @ source_mean)[:, None]])


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


class Align(Transform):
    """Warps one frame at a time, as soon as its smoothed landmarks are final (no failures)."""

    name = "align"

    def __init__(self, config: AlignConfig):
        self.config = config
        self.template = template_points(config.template, config.size)

    def warp(self, frame: np.ndarray, landmarks: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Warp a source frame into `out` (size, size, 3 uint8, e.g. a slot of the stream's crop
        buffer, which spares fresh memory per segment); returns the 2x3 affine (source -> crop)."""
        size = self.config.size
        affine = similarity_transform(landmarks, self.template)
        cv2.warpAffine(
            frame, affine, (size, size), dst=out, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        return affine
