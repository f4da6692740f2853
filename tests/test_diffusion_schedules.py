"""Rectified-flow schedule nodes and the small helpers the training stages reuse."""

import pytest
import torch

from lipforcing.diffusion import (
    add_noise,
    chunk_timesteps,
    sample_training_timesteps,
    shift_time,
    shifted_timesteps,
    sync_window,
    sync_window_scale,
    velocity_target,
    x0_from_velocity,
)


def test_shifted_nodes() -> None:
    nodes = shifted_timesteps(num_steps=50, shift=5.0)
    assert len(nodes) == 51 and nodes[0] == 1.0 and nodes[50] == 0.0
    assert (nodes[1:] < nodes[:-1]).all()
    assert nodes[20].item() == pytest.approx(0.882, abs=5e-4)
    assert nodes[30].item() == pytest.approx(0.769, abs=5e-4)
    assert nodes[40].item() == pytest.approx(0.556, abs=5e-4)
    assert nodes[25].item() == pytest.approx(0.833, abs=5e-4)  # the uniform two-step landing
    four = shift_time(1 - torch.tensor([0.0, 12.5, 25.0, 37.5], dtype=torch.float64) / 50)
    assert four.tolist() == pytest.approx([1.0, 0.9375, 0.8333, 0.625], abs=1e-4)


def test_sync_window_scale_covers_steps_20_to_40() -> None:
    low, high = sync_window()
    assert (low, high) == pytest.approx((0.5556, 0.8824), abs=1e-4)
    nodes = shifted_timesteps().float()
    scale = sync_window_scale(nodes, 4.5)
    expected = torch.tensor([4.5 if 20 <= j <= 40 else 1.0 for j in range(51)])
    assert torch.equal(scale, expected)
    assert sync_window_scale(torch.tensor([0.999, 0.769, 0.3]), 4.5).tolist() == [1.0, 4.5, 1.0]


def test_training_timesteps_are_shifted_and_clipped() -> None:
    t = sample_training_timesteps((20000,), generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 and t.max() <= 0.999
    assert t.median().item() == pytest.approx(shift_time(0.5), abs=0.02)  # shift 5 moves the median to 0.833


def test_flow_identities() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    t = torch.tensor([[0.2, 0.5, 0.9], [0.999, 0.769, 0.0]])  # per-frame times
    x_t = add_noise(x0, eps, t)
    torch.testing.assert_close(x_t[1, :, 2], x0[1, :, 2])  # t = 0 is data
    torch.testing.assert_close(x0_from_velocity(x_t, velocity_target(x0, eps), t), x0)


def test_diffusion_forcing_chunk_timesteps() -> None:
    t = chunk_timesteps(64, 21, 3, (0.999, 0.769), torch.Generator().manual_seed(0))
    assert t.shape == (64, 21)
    chunks = t.reshape(64, 7, 3)
    assert (chunks == chunks[..., :1]).all()  # one noise level per chunk
    assert t.unique().tolist() == pytest.approx([0.769, 0.999])
