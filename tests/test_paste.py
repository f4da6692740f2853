"""Paste-back of generated crops: the inverse of the aligner's warp, only the mouth box, feathered."""

from __future__ import annotations

import cv2
import numpy as np

from data_jobs.align import similarity_transform, template_points
from lipforcing.inference.paste import blend_mask, crop_affine, paste

BOX = [0.55, 0.95, 0.2, 0.8]  # window.mask_box


def test_the_blend_mask_is_one_inside_zero_outside_and_smooth_between():
    mask = blend_mask(64, BOX, feather=0.06)
    top, bottom, left, right = (round(f * 64) for f in BOX)
    outside = np.ones_like(mask, bool)
    outside[top:bottom, left:right] = False
    assert mask[outside].max() == 0.0  # the student's output never reaches past its box
    assert mask[(top + bottom) // 2, (left + right) // 2] == 1.0
    row = mask[(top + bottom) // 2, left:right]
    assert 0.0 <= row[0] < 0.2 and np.all(np.diff(row[: len(row) // 2]) >= 0)  # rises from the edge, never drops


def test_paste_inverts_the_aligners_warp_and_keeps_every_other_pixel():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    landmarks = np.array([[200.0, 150.0], [260.0, 148.0], [231.0, 185.0], [208.0, 215.0], [255.0, 213.0]])
    aligned = similarity_transform(landmarks, template_points("loose", 512))  # frame -> 512 aligned crop
    to_crop = crop_affine(aligned, 512, 128)
    crop = cv2.warpAffine(frame, to_crop, (128, 128), flags=cv2.INTER_LINEAR)
    generated = np.full_like(crop, 17)  # a planted "generated" crop: one flat colour
    mask = blend_mask(128, BOX)
    out = paste(frame, generated, to_crop, mask)

    # where the warped mask is 0 the frame is untouched, bit for bit
    weight = cv2.warpAffine(mask, to_crop, (480, 360), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    assert np.array_equal(out[weight == 0], frame[weight == 0])
    assert (weight > 0).sum() > 500  # ... and the box does land in the frame
    # deep inside the box the frame shows the generated crop
    assert np.all(np.abs(out[weight > 0.999].astype(int) - 17) <= 1)
    # the box lands where the aligner took the mouth from: between the mouth corners, below the nose
    rows, cols = np.nonzero(weight > 0.999)
    mouth = landmarks[3:].mean(0)
    assert abs(cols.mean() - mouth[0]) < 8 and landmarks[2, 1] < rows.mean() < mouth[1] + 25


def test_pasting_the_crop_itself_changes_the_frame_only_by_resampling():
    """A generated crop equal to the source crop pastes back as (almost) the same frame."""
    yy, xx = np.mgrid[0:240, 0:320]
    frame = np.dstack([xx * 0.5, yy * 0.8, (xx + yy) * 0.4]).astype(np.uint8)  # smooth: resampling is near-exact
    aligned = similarity_transform(np.array([[140.0, 100], [180, 100], [160, 125], [145, 145], [175, 145]]), template_points("loose", 512))
    to_crop = crop_affine(aligned, 512, 256)
    crop = cv2.warpAffine(frame, to_crop, (256, 256), flags=cv2.INTER_LINEAR)
    out = paste(frame, crop, to_crop, blend_mask(256, BOX))
    assert np.abs(out.astype(int) - frame.astype(int)).max() <= 3


def test_crop_affine_matches_warping_at_the_aligned_size_then_resizing():
    """Inference and eval warp at the aligner's size, then resize to the model's (pixel centres, not
    corners, are mapped): the affine for the small crop must land on the same pixels."""
    import torch

    from lipforcing.data.windows import resize_frames

    yy, xx = np.mgrid[0:300, 0:400]
    frame = np.dstack([xx * 0.6, yy * 0.8, (xx + yy) * 0.35]).astype(np.uint8)
    aligned = similarity_transform(np.array([[170.0, 120], [230, 118], [200, 150], [178, 180], [222, 178]]), template_points("loose", 512))
    big = cv2.warpAffine(frame, aligned, (512, 512), flags=cv2.INTER_LINEAR)
    resized = (resize_frames(big[None], 64)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    direct = cv2.warpAffine(frame, crop_affine(aligned, 512, 64), (64, 64), flags=cv2.INTER_LINEAR)
    inner = (slice(4, -4), slice(4, -4))  # away from the border, where the two treat the outside differently
    error = np.abs(resized[inner].astype(float) - direct[inner].astype(float)).mean()
    naive = cv2.warpAffine(frame, aligned * (64 / 512), (64, 64), flags=cv2.INTER_LINEAR)
    assert error < 1.0 and error < 0.5 * np.abs(resized[inner].astype(float) - naive[inner].astype(float)).mean()
