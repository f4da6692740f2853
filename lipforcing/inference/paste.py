"""Paste a generated face crop back into the frame it was cut from.

The data job's aligner gives each frame a 2x3 affine from frame pixels to aligned-crop pixels (at the
aligner's size, 512). The student regenerates only the mouth box of the crop (`window.mask_box`), so
only that box goes back: the crop is warped into the frame with the affine's inverse and blended
through a mask that is 1 deep inside the box and falls smoothly to 0 at its edges. The fall-off
lies inside the box, so every pixel outside it (in crop space) keeps the original frame exactly.
With a face parser, the box's weights are further multiplied by where the parser sees face surface
(`occlusion_mask`), so whatever covers the mouth stays in front of the generated one.
"""

from __future__ import annotations

import cv2
import numpy as np


def blend_mask(size: int, box: list[float], feather: float = 0.06) -> np.ndarray:
    """[S, S] float32 weights of the generated crop: 1 well inside the mouth box, a Gaussian fall-off
    over about twice `feather` * S from its edges, exactly 0 outside the box (`box`: top, bottom,
    left, right as fractions, as `window.mask_box`)."""
    top, bottom, left, right = (round(f * size) for f in box)
    margin = max(1, round(feather * size))
    mask = np.zeros((size, size), np.float32)
    mask[top + margin : bottom - margin, left + margin : right - margin] = 1.0
    if margin > 1:  # a kernel of 2 * margin - 1 pixels keeps the blur inside the box
        mask = cv2.GaussianBlur(mask, (2 * margin - 1, 2 * margin - 1), sigmaX=margin / 3)
    inside = np.zeros_like(mask)
    inside[top:bottom, left:right] = 1.0
    return np.clip(mask * inside, 0.0, 1.0)  # the blur's rounding may overshoot 1


def occlusion_mask(surfaces: list[np.ndarray], box: np.ndarray, feather: float = 0.06) -> np.ndarray:
    """[S, S] blend weights of one frame: the mouth-box weights `box` times the face-surface masks of
    the frame and its neighbours in time (`surfaces`, [S, S] each, 1 = face surface, from a face
    parser) averaged, so a parser's flicker does not flicker the mouth, and feathered like the box."""
    smooth = np.mean(surfaces, axis=0, dtype=np.float32)
    margin = max(1, round(feather * smooth.shape[-1]))
    if margin > 1:
        smooth = cv2.GaussianBlur(smooth, (2 * margin - 1, 2 * margin - 1), sigmaX=margin / 3)
    return np.clip(smooth, 0.0, 1.0) * box


def crop_affine(frame_to_aligned: np.ndarray, aligned_size: int, crop_size: int) -> np.ndarray:
    """The affine from frame pixels to a crop of `crop_size` resized from the aligned `aligned_size` one.
    A resize maps pixel centres, not corners (u_crop = s * u_aligned + (s - 1) / 2 for scale s, as
    `resize_frames` and OpenCV resize), so the translation gets that half-pixel shift too."""
    scale = crop_size / aligned_size
    matrix = frame_to_aligned * scale
    matrix[:, 2] += 0.5 * (scale - 1.0)
    return matrix


def paste(frame: np.ndarray, crop: np.ndarray, frame_to_crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`frame` (H, W, 3 uint8) with `crop` (S, S, 3 uint8) blended in through `mask` ([S, S] weights),
    both warped into the frame by the inverse of `frame_to_crop` (2x3, frame pixels -> crop pixels)."""
    height, width = frame.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # `frame_to_crop` maps the output to the input
    warped = cv2.warpAffine(crop, frame_to_crop, (width, height), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    weight = cv2.warpAffine(mask, frame_to_crop, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    rows, cols = np.nonzero(weight > 0)
    if not len(rows):
        return frame.copy()
    out = frame.copy()
    region = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))  # blend only where it can differ
    alpha = weight[region][..., None]
    out[region] = np.clip(frame[region] * (1 - alpha) + warped[region] * alpha + 0.5, 0, 255).astype(np.uint8)
    return out
