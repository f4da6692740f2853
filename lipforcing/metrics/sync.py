"""Audio-visual sync from per-frame embeddings: AV offset, Sync-C (confidence) and Sync-D.

The definitions are syncnet_python's: pad the audio embeddings by `vshift` frames at both ends;
for every video frame t take the L2 distance to padded audio t .. t + 2*vshift (31 shifts for
vshift 15); average over frames per shift (mdist); k = argmin. Then

    AV offset = vshift - k        Sync-D = mdist[k]        Sync-C = median(mdist) - mdist[k]

A positive offset means the audio leads the video by that many frames. Everything is one batched
tensor expression, so it runs unchanged on CPU or GPU and over many clips at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SyncResult:
    offset: int  # frames; audio leads video when positive
    confidence: float  # Sync-C
    min_dist: float  # Sync-D
    mean_dists: torch.Tensor  # [2*vshift+1], mdist per shift
    frame_confidence: torch.Tensor  # [T], median - min over shifts per frame (median-filtered)


def shift_distances(video_emb: torch.Tensor, audio_emb: torch.Tensor, vshift: int = 15) -> torch.Tensor:
    """Distances [..., T, 2*vshift+1] between video frame t and audio frame t + k - vshift.

    Accepts [T, D] or batched [B, T, D] embeddings of equal length.
    """
    if video_emb.shape != audio_emb.shape:
        raise ValueError(f"video and audio embeddings differ in shape: {tuple(video_emb.shape)} vs {tuple(audio_emb.shape)}")
    frames = video_emb.shape[-2]
    padded = F.pad(audio_emb, (0, 0, vshift, vshift))  # zero rows before and after, as syncnet_python
    # One vectorised pass per shift keeps memory at one [..., T, D] difference (not 31 of them).
    return torch.stack(
        [torch.linalg.vector_norm(video_emb - padded[..., k : k + frames, :], dim=-1) for k in range(2 * vshift + 1)],
        dim=-1,
    )


def av_sync(video_emb: torch.Tensor, audio_emb: torch.Tensor, vshift: int = 15) -> SyncResult:
    """AV offset, Sync-C and Sync-D of one clip from per-frame embeddings `[T, D]`."""
    dists = shift_distances(video_emb.float(), audio_emb.float(), vshift)
    mean_dists = dists.mean(dim=0)
    best = int(torch.argmin(mean_dists))
    min_dist = mean_dists[best]
    confidence = torch.median(mean_dists) - min_dist
    frame_conf = torch.median(dists, dim=1).values - dists.min(dim=1).values
    return SyncResult(
        offset=vshift - best,
        confidence=float(confidence),
        min_dist=float(min_dist),
        mean_dists=mean_dists,
        frame_confidence=_median_filter(frame_conf, kernel=9),
    )


def sync_confidence_batch(video_emb: torch.Tensor, audio_emb: torch.Tensor, vshift: int = 15) -> torch.Tensor:
    """Sync-C for a batch `[B, T, D]` in one call (the DMD reward scores many clips per step)."""
    mean_dists = shift_distances(video_emb.float(), audio_emb.float(), vshift).mean(dim=-2)
    return torch.median(mean_dists, dim=-1).values - mean_dists.min(dim=-1).values


def _median_filter(values: torch.Tensor, kernel: int) -> torch.Tensor:
    """scipy.signal.medfilt semantics: zero padding, odd kernel, same length."""
    half = kernel // 2
    padded = F.pad(values, (half, half))
    return padded.unfold(0, kernel, 1).median(dim=-1).values
