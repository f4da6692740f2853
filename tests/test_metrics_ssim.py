"""Frame metrics against independent references: SSIM vs scikit-image, Fréchet distance vs closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from lipforcing.metrics.fid import (
    feature_statistics,
    frechet_distance,
    inception_extractor,
    load_torchscript,
)
from lipforcing.metrics.ssim import psnr, ssim


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """scikit-image with Wang et al.'s settings, on [H, W, C] images in [0, 1]."""
    return structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1
    )


def ours(x: np.ndarray, y: np.ndarray) -> float:
    to_chw = lambda a: torch.from_numpy(a).permute(2, 0, 1).float()  # noqa: E731
    return float(ssim(to_chw(x), to_chw(y)))


def structured_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A face-like smooth image with edges, and a shifted, noisier, darker copy."""
    yy, xx = np.mgrid[0:64, 0:48] / 64.0
    base = 0.5 + 0.3 * np.sin(8 * xx) * np.cos(5 * yy)
    base[20:40, 10:30] = 0.9  # a bright box: hard edges
    image = np.stack([base, base * 0.8, 1 - base], axis=-1)
    other = np.roll(image, 2, axis=1) * 0.9 + rng.normal(0, 0.05, image.shape)
    return image.clip(0, 1), other.clip(0, 1)


def test_ssim_matches_skimage_on_random_images():
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.random((40, 56, 3))
        y = (x + rng.normal(0, 0.2, x.shape)).clip(0, 1)
        assert ours(x, y) == pytest.approx(reference_ssim(x, y), abs=1e-3)
        z = rng.random((40, 56, 3))  # unrelated images: SSIM near 0
        assert ours(x, z) == pytest.approx(reference_ssim(x, z), abs=1e-3)


def test_ssim_matches_skimage_on_structured_images():
    x, y = structured_pair(np.random.default_rng(1))
    expected = reference_ssim(x, y)
    assert 0.2 < expected < 0.95  # a meaningful middle value, not a trivial one
    assert ours(x, y) == pytest.approx(expected, abs=1e-3)


def test_masked_ssim_averages_the_skimage_map_over_the_region():
    """With a mask, the mean of scikit-image's full SSIM map over the window centres the mask keeps.
    Planted: y differs from x only from row 40 down, so a region whose windows end above it scores 1."""
    x, noisy = structured_pair(np.random.default_rng(2))
    y = x.copy()
    y[40:] = noisy[40:]
    to_chw = lambda a: torch.from_numpy(a).permute(2, 0, 1).float()  # noqa: E731
    _, full = structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1, full=True
    )
    inner = (slice(5, -5), slice(5, -5))  # centres where the 11 x 11 window fits
    for rows, expected_one in ((slice(0, 30), True), (slice(30, 64), False)):
        mask = np.zeros(x.shape[:2], bool)
        mask[rows] = True
        got = float(ssim(to_chw(x), to_chw(y), mask=torch.from_numpy(mask)))
        assert got == pytest.approx(full[inner][mask[inner]].mean(), abs=1e-3)
        assert (got == pytest.approx(1.0, abs=1e-6)) == expected_one
    assert ours(x, y) < 0.95


def test_ssim_of_identical_images_is_one_and_batches_keep_their_shape():
    video = torch.rand(2, 5, 3, 32, 32)
    assert torch.allclose(ssim(video, video), torch.ones(2, 5), atol=1e-6)
    noisy = (video + 0.1 * torch.randn_like(video)).clamp(0, 1)
    batched = ssim(noisy, video)
    assert batched.shape == (2, 5)
    one = ssim(noisy[1, 3], video[1, 3])
    assert float(batched[1, 3]) == pytest.approx(float(one), abs=1e-6)
    assert (batched < 1).all() and (batched > -1).all()


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


def test_psnr_known_values_and_mask():
    x = torch.zeros(3, 16, 16)
    y = torch.full((3, 16, 16), 0.1)  # MSE 0.01 -> 20 dB
    assert float(psnr(x, y)) == pytest.approx(20.0, abs=1e-4)
    y[:, :8] = 0  # top half exact; the mask selects only the bottom half
    mask = torch.zeros(16, 16)
    mask[8:] = 1
    assert float(psnr(x, y, mask=mask)) == pytest.approx(20.0, abs=1e-4)


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_rank_deficient_features_is_finite():
    """Fewer samples than dimensions (eval on a handful of clips): singular covariances still work."""
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(5, 16)), rng.normal(loc=1.0, size=(5, 16))
    value = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert np.isfinite(value) and value > 0
    assert frechet_distance(*feature_statistics(real), *feature_statistics(real)) == pytest.approx(
        0.0, abs=1e-3
    )


class PoolFeatures(torch.nn.Module):
    """Stands in for the Inception TorchScript file's calling convention (uint8 in, features out)."""

    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_feature_hook_loads_torchscript_and_names_the_config_key(tmp_path):
    path = str(tmp_path / "features.pt")
    torch.jit.script(PoolFeatures()).save(path)
    extract = inception_extractor(load_torchscript(path, "fid_weights"))
    frames = torch.rand(4, 3, 16, 16)
    assert torch.allclose(extract(frames), (frames * 255).round().mean(dim=(2, 3)))
    with pytest.raises(FileNotFoundError, match="fid_weights"):
        load_torchscript(str(tmp_path / "missing.pt"), "fid_weights")
