"""Sync metric: the vectorised av_sync equals a plain loop over syncnet_python's definitions."""

from __future__ import annotations

import pytest
import torch

from lipforcing.metrics.sync import av_sync, sync_confidence_batch


def loop_reference(video, audio, vshift=15):
    """Direct transcription of the definitions: one distance at a time."""
    frames = len(video)
    padded = [torch.zeros_like(audio[0])] * vshift + list(audio) + [torch.zeros_like(audio[0])] * vshift
    mdist = []
    for shift in range(2 * vshift + 1):
        total = 0.0
        for t in range(frames):
            total += float(torch.sqrt(((video[t] - padded[t + shift]) ** 2).sum()))
        mdist.append(total / frames)
    best = min(range(len(mdist)), key=lambda k: mdist[k])
    ordered = sorted(mdist)
    median = ordered[len(ordered) // 2]
    return vshift - best, median - mdist[best], mdist[best], mdist


def planted(shift, frames=60, dim=32, noise=0.3, seed=0):
    """Video embeddings that match the audio embeddings `shift` frames later (audio lags)."""
    generator = torch.Generator().manual_seed(seed)
    audio = torch.randn(frames, dim, generator=generator)
    video = torch.randn(frames, dim, generator=generator) * 2
    for t in range(frames):
        if 0 <= t + shift < frames:
            video[t] = audio[t + shift] + noise * torch.randn(dim, generator=generator)
    return video, audio


@pytest.mark.parametrize("shift", [-7, -1, 0, 3, 12])
def test_matches_loop_reference(shift):
    video, audio = planted(shift)
    result = av_sync(video, audio)
    offset, confidence, min_dist, mdist = loop_reference(video, audio)
    assert result.offset == offset
    assert result.confidence == pytest.approx(confidence, rel=1e-5)
    assert result.min_dist == pytest.approx(min_dist, rel=1e-5)
    assert torch.allclose(result.mean_dists, torch.tensor(mdist), rtol=1e-5)


@pytest.mark.parametrize("shift", [2, 6, 11])
def test_planted_shift_is_found_with_the_sign_convention(shift):
    lagging_audio = av_sync(*planted(shift))
    leading_audio = av_sync(*planted(-shift))
    assert lagging_audio.offset == -shift
    assert leading_audio.offset == shift
    assert lagging_audio.confidence > 1.0 and leading_audio.confidence > 1.0


def test_symmetric_shifts_mirror_each_other():
    video, audio = planted(4)
    forward = av_sync(video, audio)
    backward = av_sync(audio, video)  # swap roles: the same pairing seen from the other side
    assert backward.offset == -forward.offset
    assert backward.confidence > 1.0


def test_unrelated_embeddings_have_low_confidence():
    generator = torch.Generator().manual_seed(1)
    result = av_sync(torch.randn(80, 32, generator=generator), torch.randn(80, 32, generator=generator))
    synced = av_sync(*planted(0, frames=80))
    assert result.confidence < 0.5 * synced.confidence


def test_batch_confidence_equals_per_clip():
    clips = [planted(s, seed=s + 20) for s in (-3, 0, 5)]
    batch = sync_confidence_batch(torch.stack([v for v, _ in clips]), torch.stack([a for _, a in clips]))
    singles = torch.tensor([av_sync(v, a).confidence for v, a in clips])
    assert torch.allclose(batch, singles, rtol=1e-5)


def test_frame_confidence_has_one_value_per_frame():
    video, audio = planted(0, frames=40)
    assert av_sync(video, audio).frame_confidence.shape == (40,)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="differ in shape"):
        av_sync(torch.zeros(10, 4), torch.zeros(11, 4))
