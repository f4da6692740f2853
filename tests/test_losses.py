"""DMD, reward weighting, the 5:1 schedule and flow matching, on problems whose answers are known."""

from __future__ import annotations

import pytest
import torch

from lipforcing.diffusion.schedules import add_noise
from lipforcing.losses.diffusion_forcing import diffusion_forcing_loss
from lipforcing.losses.dmd import dmd_gradient, dmd_loss_per_sample, student_updates_at
from lipforcing.losses.flow_matching import flow_matching_loss
from lipforcing.losses.reward import reward_weights, weighted_loss


def gaussian_x0(x_t: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """E[x0 | x_t] for data N(mean, std^2) under x_t = (1 - t) x0 + t eps: an exact denoiser."""
    a = 1 - t
    gain = a * std**2 / (a**2 * std**2 + t**2)
    return mean + gain * (x_t - a * mean)


def test_dmd_moves_the_student_distribution_toward_the_teacher():
    """Student G(z) = theta + z; teacher data N(3, 1); the fake score is the exact denoiser of the
    student's own distribution. Following the DMD loss must carry theta to the teacher's mean."""
    torch.manual_seed(0)
    theta = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=0.5)
    real_mean = torch.tensor(3.0)
    for _ in range(60):
        x0 = theta + torch.randn(64, 1)
        t = torch.rand(64, 1) * 0.9 + 0.05
        x_t = add_noise(x0.detach(), torch.randn_like(x0), t.squeeze(1))
        x0_real = gaussian_x0(x_t, t, real_mean)
        x0_fake = gaussian_x0(x_t, t, theta.detach())
        loss = dmd_loss_per_sample(x0, x0_real, x0_fake).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert abs(theta.item() - 3.0) < 0.3


def test_dmd_gradient_is_normalised_per_sample():
    x0 = torch.tensor([[1.0, 1.0], [10.0, 10.0]])
    real = torch.zeros(2, 2)
    fake = torch.tensor([[0.5, 0.5], [5.0, 5.0]])
    grad = dmd_gradient(x0, real, fake)
    assert torch.allclose(grad, torch.full((2, 2), 0.5))  # (fake - real) / mean|x0 - real|


def test_dmd_loss_gradient_equals_the_direction():
    x0 = torch.randn(3, 4, requires_grad=True)
    real, fake = torch.randn(3, 4), torch.randn(3, 4)
    dmd_loss_per_sample(x0, real, fake).sum().backward()
    expected = dmd_gradient(x0.detach(), real, fake) / 4  # mean over 4 elements per sample
    assert torch.allclose(x0.grad, expected, atol=1e-6)


def test_five_to_one_schedule():
    student = [i for i in range(20) if student_updates_at(i, 5)]
    assert student == [0, 5, 10, 15]
    assert sum(student_updates_at(i, 5) for i in range(600)) == 120  # 600 fake-score updates


def test_reward_weights_are_forward_only_and_exponential():
    confidence = torch.tensor([0.0, 1.0, 2.0], requires_grad=True)
    weights = reward_weights(confidence, beta=2.0)
    assert not weights.requires_grad
    assert torch.allclose(weights, torch.exp(torch.tensor([0.0, 2.0, 4.0])))


def test_per_sample_and_self_normalised_weighting():
    losses = torch.tensor([1.0, 2.0, 3.0])
    weights = torch.tensor([1.0, 1.0, 2.0])
    assert weighted_loss(losses, weights, "per_sample").item() == pytest.approx((1 + 2 + 6) / 3)
    assert weighted_loss(losses, weights, "self_normalised").item() == pytest.approx((1 + 2 + 6) / 4)
    assert weighted_loss(losses, None).item() == pytest.approx(2.0)
    scaled = weights * 1000
    assert weighted_loss(losses, scaled, "self_normalised").item() == pytest.approx((1 + 2 + 6) / 4)
    with pytest.raises(ValueError, match="per_sample, self_normalised"):
        weighted_loss(losses, weights, "softmax")


def test_flow_matching_loss_is_zero_at_the_true_velocity_and_masks():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    assert flow_matching_loss(noise - x0, x0, noise).item() == 0.0
    prediction = noise - x0 + torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    assert flow_matching_loss(prediction, x0, noise, weight=mask).item() == 0.0
    assert flow_matching_loss(prediction, x0, noise).item() == pytest.approx(1 / 3)


class RecordingStudent(torch.nn.Module):
    """Stands in for the causal student: a fixed velocity, and a record of the times and layout it got."""

    def __init__(self, velocity: torch.Tensor):
        super().__init__()
        self.velocity, self.calls = velocity, []

    def forward(self, x, t, cond, window_frames=None, sink_frames=0):
        self.calls.append((x, t, window_frames, sink_frames))
        return self.velocity


def test_diffusion_forcing_draws_clean_chunks_and_scores_the_clean_estimate():
    """Released recipe: each chunk's level uniform over [0.999, 0.769, 0.0] (a third clean), loss
    0.5 * MSE(x0_hat, x0) with x0_hat = x_t - t v, where clean chunks have x0_hat = x0 exactly."""
    from pipelines.distill_config import DistillConfig

    student_config = DistillConfig().student
    assert student_config.noise_levels == [0.999, 0.769, 0.0] and student_config.loss == "x0"
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 16, 9, 2, 2, generator=generator)
    velocity = torch.randn(x0.shape, generator=generator)
    student = RecordingStudent(velocity)
    loss = diffusion_forcing_loss(student, x0, None, student_config.noise_levels, 3, (7, 1), torch.Generator().manual_seed(1))

    noisy, t, window, sink = student.calls[0]
    assert (window, sink) == (7, 1)
    chunk_levels = t[:, ::3]  # [B, F] per-frame times, constant within each 3-frame chunk
    assert torch.equal(t, chunk_levels.repeat_interleave(3, dim=1))
    assert chunk_levels.unique().tolist() == pytest.approx([0.0, 0.769, 0.999])
    assert abs(float((chunk_levels == 0).float().mean()) - 1 / 3) < 0.07  # 192 chunks
    clean = (t == 0)[:, None, :, None, None].expand_as(x0)
    assert torch.equal(noisy[clean], x0[clean])  # clean chunks enter as they are: context for the rest
    x0_hat = noisy - t[:, None, :, None, None] * velocity
    assert torch.allclose(loss, 0.5 * ((x0_hat - x0) ** 2).mean())
    assert torch.equal(x0_hat[clean], x0[clean])  # so they add no error of their own


def test_diffusion_forcing_velocity_variant_is_the_flow_matching_loss():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 6, 2, 2, generator=generator)
    student = RecordingStudent(torch.randn(x0.shape, generator=generator))
    loss = diffusion_forcing_loss(student, x0, None, [0.999, 0.769], 3, (7, 1), torch.Generator().manual_seed(1), "velocity")
    noisy, t, _, _ = student.calls[0]
    noise = (noisy - (1 - t[:, None, :, None, None]) * x0) / t[:, None, :, None, None]
    assert torch.allclose(loss, flow_matching_loss(student.velocity, x0, noise), atol=1e-5)
