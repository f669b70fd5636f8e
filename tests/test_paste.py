"""Pasting M x M mask probabilities into the image: torchvision's integer box and the aligned paste."""

import numpy as np
import pytest
from optional_torch import import_torch

from tinymrcnn.data.segmentation import mask_to_box
from tinymrcnn.model.transform import paste_masks_in_image
from tinymrcnn.ops import roi_align


def aligned_paste_per_pixel(mask, box, H, W):
    """The aligned paste one pixel at a time: bilinear at the pixel's centre, zeros outside the map."""
    M = mask.shape[0]
    x1, y1, x2, y2 = (float(v) for v in box)
    out = np.zeros((H, W))
    if not (x2 > x1 and y2 > y1):
        return out
    for y in range(H):
        for x in range(W):
            u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5  # column of the map
            v = (y + 0.5 - y1) / (y2 - y1) * M - 0.5  # row of the map
            i0, j0 = int(np.floor(v)), int(np.floor(u))
            total = 0.0
            for i, wi in ((i0, 1 - (v - i0)), (i0 + 1, v - i0)):
                for j, wj in ((j0, 1 - (u - j0)), (j0 + 1, u - j0)):
                    if 0 <= i < M and 0 <= j < M:
                        total += wi * wj * mask[i, j]
            out[y, x] = total
    return out


BOXES = np.array(
    [
        [10.3, 5.7, 31.9, 40.2],  # inside, fractional corners
        [-6.5, 20.0, 12.25, 29.5],  # crosses the left edge
        [30.0, 33.4, 45.0, 52.0],  # crosses the bottom-right corner
        [17.2, 8.6, 17.9, 9.1],  # smaller than a pixel
        [3.0, 4.0, 27.0, 28.0],  # integer corners
    ],
    dtype=np.float32,
)


def test_aligned_paste_matches_the_per_pixel_definition():
    rng = np.random.default_rng(0)
    masks = rng.random((len(BOXES), 7, 7)).astype(np.float32)
    H, W = 40, 48
    out = paste_masks_in_image(masks, BOXES, (H, W), aligned=True)
    assert out.shape == (len(BOXES), H, W) and out.dtype == np.float32
    for i in range(len(BOXES)):
        np.testing.assert_allclose(out[i], aligned_paste_per_pixel(masks[i], BOXES[i], H, W), rtol=0, atol=1e-6)


def test_aligned_paste_empty_cases():
    masks = np.ones((3, 5, 5), np.float32)
    boxes = np.array([[4, 4, 4, 9], [2, 3, 8, 3], [60, 60, 70, 70]], np.float32)  # zero width, zero height, outside
    assert not paste_masks_in_image(masks, boxes, (20, 30), aligned=True).any()
    none = paste_masks_in_image(np.zeros((0, 5, 5), np.float32), np.zeros((0, 4), np.float32), (20, 30), aligned=True)
    assert none.shape == (0, 20, 30)


def test_aligned_paste_undoes_the_aligned_mask_target():
    """Disks cut out of their proposal boxes (tight, or off by fractions of a pixel) as 28 x 28
    targets by aligned RoIAlign, as the training targets are, and pasted back at those boxes come
    back nearly whole; the integer-box paste moves them by up to a pixel."""
    H = W = 64
    yy, xx = np.mgrid[:H, :W] + 0.5
    ious = {False: [], True: []}
    for cy, cx, r in [(30.3, 21.6, 9.2), (20.1, 40.7, 6.3), (33.3, 33.3, 14.0)]:
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        for shift in ([0, 0, 0, 0], [-1.3, 0.6, 0.8, -0.45], [0.4, -0.7, -0.3, 1.2]):
            box = mask_to_box(disk) + np.array(shift, np.float32)
            rois = np.array([[0, *box]])
            target = roi_align(disk[None, None].astype(np.float64), rois, 28, sampling_ratio=0, aligned=True)[0, 0]
            for aligned in (False, True):
                pasted = paste_masks_in_image(target[None].astype(np.float32), box[None], (H, W), aligned=aligned)
                pasted = pasted[0] >= 0.5
                ious[aligned].append((pasted & disk).sum() / (pasted | disk).sum())
    assert min(ious[True]) >= 0.95 and np.mean(ious[True]) >= 0.98, ious[True]
    assert np.mean(ious[False]) <= np.mean(ious[True]) - 0.05, ious[False]


def test_aligned_paste_matches_grid_sample():
    """detectron2's paste: torch's grid_sample (bilinear, zeros outside, align_corners=False) at
    every pixel centre, the box mapped to [-1, 1]."""
    torch = import_torch()
    rng = np.random.default_rng(1)
    masks = rng.random((len(BOXES), 28, 28)).astype(np.float32)
    H, W = 50, 60
    ours = paste_masks_in_image(masks, BOXES, (H, W), aligned=True)
    b = torch.from_numpy(BOXES.astype(np.float64))
    gx = (torch.arange(W, dtype=torch.float64) + 0.5 - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1  # (D, W)
    gy = (torch.arange(H, dtype=torch.float64) + 0.5 - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1  # (D, H)
    grid = torch.stack([gx[:, None, :].expand(-1, H, -1), gy[:, :, None].expand(-1, -1, W)], dim=3)
    theirs = torch.nn.functional.grid_sample(
        torch.from_numpy(masks.astype(np.float64))[:, None], grid, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("aligned", [False, True])
def test_model_pastes_as_its_config_says(aligned):
    from tinymrcnn.config import MaskRCNNConfig
    from tinymrcnn.model.transform import Transform

    t = Transform(MaskRCNNConfig.shapes(mask_paste_aligned=aligned))
    probs = np.random.default_rng(2).random((2, 28, 28)).astype(np.float32)
    det = {"boxes": BOXES[:2], "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8]), "mask_probs": probs}
    (res,) = t.postprocess([det], [(64, 64)], [(64, 64)])
    np.testing.assert_array_equal(res["masks"], paste_masks_in_image(probs, BOXES[:2], (64, 64), aligned=aligned))
