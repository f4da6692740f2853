"""Fréchet distances between feature distributions: FID (Inception frames) and FVD (I3D clips).

The distance is the closed form between two Gaussians fitted to features. The features come from
fixed pretrained networks that we never download or re-implement: they load from local TorchScript
files, the same files the common reference implementations use, so numbers stay comparable:

- FID: `inception-2015-12-05.pt` (the StyleGAN / clean-fid export of TF Inception-v3), called on
  uint8-valued [N, 3, H, W] images with `return_features=True` -> [N, 2048] pool features.
- FVD: `i3d_torchscript.pt` (the StyleGAN-V export of the Kinetics-400 I3D), called on
  [N, 3, T, H, W] clips in [-1, 1] with `rescale=False, resize=True, return_features=True` -> [N, 400].

Without such a file the caller skips the metric; a randomly initialised network is never a stand-in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from lipforcing import storage

FeatureExtractor = Callable[[Tensor], Tensor]


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D] (float64, N >= 2)."""
    values = np.asarray(
        features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64
    )
    if values.ndim != 2 or len(values) < 2:
        raise ValueError(f"need features [N >= 2, D] for a covariance, got shape {values.shape}")
    return values.mean(axis=0), np.cov(values, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2).

    When the product is singular (fewer samples than feature dimensions) its square root is taken
    after adding eps to both diagonals, as the reference FID code does; a tiny imaginary part
    from numerical error is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}"
        )
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"matrix square root has a large imaginary part: {np.abs(covmean.imag).max():.3g}"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_torchscript(path: str, key: str, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript feature network from a local path or URL; `key` names the config key for errors."""
    if not storage.exists(path):
        raise FileNotFoundError(f"feature network not found at {path!r} (config key '{key}')")
    fs, local = storage.filesystem(path)
    with fs.open(local, "rb") as handle:
        return torch.jit.load(handle, map_location=device).eval()


def inception_extractor(network: torch.nn.Module) -> FeatureExtractor:
    """FID features: frames [N, 3, H, W] in [0, 1] -> [N, 2048] (the network resizes to 299 itself)."""

    @torch.no_grad()
    def extract(frames: Tensor) -> Tensor:
        images = (frames * 255).round().clamp(0, 255).to(torch.uint8)
        return network(images, return_features=True).float()

    return extract


def i3d_extractor(network: torch.nn.Module) -> FeatureExtractor:
    """FVD features: clips [N, T, 3, H, W] in [0, 1] -> [N, 400] (the network resizes to 224 itself)."""

    @torch.no_grad()
    def extract(clips: Tensor) -> Tensor:
        videos = clips.transpose(1, 2) * 2 - 1
        return network(videos, rescale=False, resize=True, return_features=True).float()

    return extract
