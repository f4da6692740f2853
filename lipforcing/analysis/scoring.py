"""Mouth-region fidelity of decoded frames against their source: LPIPS when its network is given,
else mouth-region L1, a documented fallback that is labelled as such wherever it is reported.

LPIPS comes as a TorchScript module by path (nothing is downloaded): `network(x, y)` on images
[N, 3, H, W] in [-1, 1] returning one distance per image (any trailing singleton dimensions), e.g.
`torch.jit.trace(lpips.LPIPS(net="alex"), (x, y))` saved with `torch.jit.save`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LPIPS_NAME, FALLBACK_NAME = "mouth_lpips", "mouth_l1"


def mask_box(mask: Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom and right exclusive: the bounding box of mask [H, W] > 0."""
    rows, cols = torch.nonzero(mask > 0, as_tuple=True)
    if len(rows) == 0:
        raise ValueError("the mouth mask is empty")
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


class MouthFidelity:
    """Distance (lower is better) between frames and their source inside the mouth region."""

    def __init__(self, mouth: Tensor, lpips: nn.Module | None = None):
        self.mouth, self.lpips = mouth, lpips  # mouth [H, W]: 1 where the model repaints; on lpips's device
        self.box = mask_box(mouth)

    @property
    def name(self) -> str:
        return LPIPS_NAME if self.lpips is not None else FALLBACK_NAME

    @torch.no_grad()
    def __call__(self, frames: Tensor, source: Tensor) -> float:
        """frames, source [T, 3, H, W] in [0, 1] -> the mean distance over frames."""
        frames, source = frames.to(self.mouth.device).float(), source.to(self.mouth.device).float()
        if self.lpips is None:
            mouth = self.mouth.float()
            return float(((frames - source).abs() * mouth).sum() / (3 * len(frames) * mouth.sum()))
        top, bottom, left, right = self.box
        crop = (slice(None), slice(None), slice(top, bottom), slice(left, right))
        return float(self.lpips(frames[crop] * 2 - 1, source[crop] * 2 - 1).flatten().mean())
