"""Image-quality filter on the aligned crops: first, middle and last frame, mean score, drop below
`iqa.threshold` (40 on the KonIQ 0-100 scale, as in the paper).

Backends:
- `hyperiqa`: the published HyperIQA KonIQ checkpoint (by path, `iqa.weights`).
- `sharpness`: no weights. Variance of the Laplacian of the grey crop at a fixed 256 px analysis
  size, mapped to 0-100 by 100 * (1 - exp(-v / SHARPNESS_SCALE)). The scale is calibrated on the
  embedded sample so its blurred clip scores well under 40 and the sharp clips well over it; it
  measures focus/blur only, not compression or exposure.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from data_jobs.config import IqaConfig
from data_jobs.pipeline import Sample, Transform

ANALYSIS_SIZE = 256
SHARPNESS_SCALE = 23.0


def sharpness_score(image: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    grey = cv2.resize(grey, (ANALYSIS_SIZE, ANALYSIS_SIZE), interpolation=cv2.INTER_AREA).astype(np.float64)
    variance = cv2.Laplacian(grey, cv2.CV_64F).var()
    return float(100.0 * (1.0 - np.exp(-variance / SHARPNESS_SCALE)))


class HyperIQAScorer:
    def __init__(self, weights: str, device: str = "cpu"):
        import torch

        from data_jobs.hyperiqa import load_hyperiqa
        from lipforcing import storage

        storage.require(weights, "iqa.weights")
        torch.set_num_threads(1)
        self._torch, self._device = torch, device
        self._model = load_hyperiqa(storage.cached(weights)).to(device)

    def __call__(self, image: np.ndarray) -> float:
        from data_jobs.hyperiqa import five_crops

        with self._torch.inference_mode():
            return float(self._model(five_crops(image).to(self._device)).mean())


@functools.cache
def iqa_scorer(backend: str, weights: str = "", device: str = "cpu"):
    """One loaded scorer per worker process; `device` places HyperIQA (sharpness is numpy)."""
    return HyperIQAScorer(weights, device) if backend == "hyperiqa" else sharpness_score


class Iqa(Transform):
    name = "iqa"

    def __init__(self, config: IqaConfig, device: str = "cpu"):
        self.config, self.device = config, device

    def __call__(self, sample: Sample) -> Sample:
        scorer = iqa_scorer(self.config.backend, self.config.weights, self.device)
        last = len(sample.frames) - 1
        scores = [scorer(sample.frames[i]) for i in (0, last // 2, last)]
        sample.iqa = float(np.mean(scores))
        if sample.iqa < self.config.threshold:
            detail = f"{self.config.backend} {sample.iqa:.1f} < {self.config.threshold} (frames {scores})"
            return sample.fail(self.name, "low_quality", detail)
        return sample
