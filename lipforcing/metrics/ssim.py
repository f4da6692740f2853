"""SSIM (Wang et al. 2004) and PSNR on batches of frames, in torch: eval scores where it generates.

SSIM uses the standard constants: an 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
population (not sample) statistics, computed per channel and averaged over channels and over the
positions where the window fits inside the image (a "valid" filter). That is what
`skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)` computes, which the tests check against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_kernel(size: int = WINDOW, sigma: float = SIGMA, dtype: torch.dtype = torch.float32) -> Tensor:
    """The normalised 1-D Gaussian taps of the separable SSIM window."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (taps / taps.sum()).to(dtype)


def _filter(x: Tensor, taps: Tensor) -> Tensor:
    """Separable valid Gaussian filter of [N, C, H, W], each channel on its own."""
    channels = x.shape[1]
    horizontal = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(x, horizontal, groups=channels), vertical, groups=channels)


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Mean SSIM per image of x, y [..., C, H, W] (values in [0, data_range]) -> [...].

    Leading dimensions are batch dimensions (e.g. [B, T] of a video batch). Computed in float32 at
    least; images must be at least 11 x 11. With `mask` [H, W], the mean runs over the windows
    centred where it is 1 (e.g. the region a lip-sync model keeps).
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] < WINDOW or x.shape[-2] < WINDOW:
        raise ValueError(f"ssim needs images of at least {WINDOW}x{WINDOW}, got {tuple(x.shape[-2:])}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    lead = x.shape[:-3]
    x, y = x.reshape(-1, *x.shape[-3:]).to(dtype), y.reshape(-1, *y.shape[-3:]).to(dtype)
    taps = gaussian_kernel(dtype=dtype).to(x.device)
    mu_x, mu_y = _filter(x, taps), _filter(y, taps)
    var_x = _filter(x * x, taps) - mu_x**2
    var_y = _filter(y * y, taps) - mu_y**2
    cov = _filter(x * y, taps) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    if mask is None:
        return index.mean(dim=(-3, -2, -1)).reshape(lead)
    half = WINDOW // 2
    centres = mask[half:-half, half:-half].to(index).expand_as(index)  # the valid map's window centres
    return ((index * centres).sum(dim=(-3, -2, -1)) / centres.sum(dim=(-3, -2, -1))).reshape(lead)


def psnr(x: Tensor, y: Tensor, mask: Tensor | None = None, data_range: float = 1.0) -> Tensor:
    """PSNR in dB per image of x, y [..., C, H, W] over the pixels where `mask` [H, W] is 1 (default all)."""
    error = (x.float() - y.float()) ** 2
    if mask is None:
        mse = error.mean(dim=(-3, -2, -1))
    else:
        weight = mask.to(error).expand_as(error)
        mse = (error * weight).sum(dim=(-3, -2, -1)) / weight.sum(dim=(-3, -2, -1))
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
