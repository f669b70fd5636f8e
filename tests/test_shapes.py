"""ShapesDataset: determinism, splits, occlusion-aware masks, tight boxes."""

import hashlib

import numpy as np
import pytest

from tinymrcnn.data import ShapesDataset
from tinymrcnn.data.segmentation import mask_to_box


def _digest(image):
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_item_types_and_shapes():
    ds = ShapesDataset(5, seed=1)
    assert len(ds) == 5 and ds.num_classes == 3 and ds.class_names == ("square", "circle", "triangle")
    for i in range(len(ds)):
        image, t = ds[i]
        n = len(t["labels"])
        assert image.dtype == np.float32 and image.shape == (3, 128, 128) and image.flags.c_contiguous
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert t["boxes"].dtype == np.float32 and t["boxes"].shape == (n, 4)
        assert t["labels"].dtype == np.int64 and set(t["labels"]) <= {1, 2, 3}
        assert t["masks"].dtype == np.uint8 and t["masks"].shape == (n, 128, 128)
        assert set(np.unique(t["masks"])) <= {0, 1}
        assert 1 <= n <= 4
        assert t["image_id"] == i
        np.testing.assert_array_equal(t["area"], t["masks"].sum(axis=(1, 2)))
        np.testing.assert_array_equal(t["iscrowd"], 0)


def test_deterministic_and_independent_of_access_order():
    a, b = ShapesDataset(30, seed=7), ShapesDataset(30, seed=7)
    forward = [a[i] for i in range(30)]
    backward = [b[i] for i in reversed(range(30))][::-1]
    for (ia, ta), (ib, tb) in zip(forward, backward):
        np.testing.assert_array_equal(ia, ib)
        for key in ("boxes", "labels", "masks"):
            np.testing.assert_array_equal(ta[key], tb[key])
    np.testing.assert_array_equal(a[-1][0], a[29][0])
    other = ShapesDataset(30, seed=8)
    assert sum(_digest(a[i][0]) == _digest(other[i][0]) for i in range(30)) == 0


def test_heldout_split_never_overlaps_train():
    heldout = ShapesDataset.heldout()
    assert len(heldout) == 200 and heldout.split == "val"
    val = {_digest(heldout[i][0]) for i in range(len(heldout))}
    assert len(val) == 200
    for seed in (0, 1):  # whatever seed training uses
        train = ShapesDataset(400, seed=seed, split="train")
        assert not val & {_digest(train[i][0]) for i in range(len(train))}


@pytest.mark.parametrize("difficulty,size", [("normal", 128), ("hard", 128), ("normal", 64), ("normal", 256)])
def test_masks_are_the_visible_parts_and_boxes_are_tight(difficulty, size):
    ds = ShapesDataset(40, image_size=size, seed=2, difficulty=difficulty)
    for i in range(len(ds)):
        image, t = ds[i]
        masks = t["masks"].astype(bool)
        # later shapes hide earlier ones: the visible masks never overlap
        assert masks.sum(axis=0).max() <= 1
        # every pixel of a mask shows that shape's single colour, every other pixel the background
        pixels = image.reshape(3, -1).T  # (H*W, 3)
        background = ~masks.any(axis=0).ravel()
        assert len(np.unique(pixels[background], axis=0)) == 1
        colours = [np.unique(pixels[m.ravel()], axis=0) for m in masks]
        assert all(len(c) == 1 for c in colours)
        assert len({tuple(c[0]) for c in colours} | {tuple(pixels[background][0])}) == len(masks) + 1
        for box, m in zip(t["boxes"], masks):
            np.testing.assert_array_equal(box, mask_to_box(m))
            assert box[2] > box[0] and box[3] > box[1]
            x1, y1, x2, y2 = box.astype(int)
            assert m[y1:y2, x1:x2].sum() == m.sum()  # nothing outside the box
            assert m[y1, x1:x2].any() and m[y2 - 1, x1:x2].any()  # ... and no slack
            assert m[y1:y2, x1].any() and m[y1:y2, x2 - 1].any()
        # no shape is (nearly) hidden
        assert t["area"].min() >= (40 if difficulty == "hard" else 100) * (size / 128) ** 2 * 0.25


def test_occlusion_is_exercised():
    """A whole square (even clipped by the border) fills its box; a partly hidden one does not."""
    ds = ShapesDataset(200, seed=0)
    hidden = 0
    for i in range(len(ds)):
        _, t = ds[i]
        for box, label, area in zip(t["boxes"], t["labels"], t["area"]):
            hidden += label == 1 and area < (box[2] - box[0]) * (box[3] - box[1])
    assert hidden >= 5


def test_shape_geometry_follows_the_spec():
    from tinymrcnn.data.shapes import draw_shape

    sq = draw_shape(1, 64.0, 64.0, 20.0, 128)
    assert sq.sum() == 40 * 40 and mask_to_box(sq).tolist() == [44, 44, 84, 84]
    circle = draw_shape(2, 64.0, 64.0, 20.0, 128)
    assert abs(circle.sum() - np.pi * 20**2) < 2 * np.pi * 20  # within one perimeter
    tri = draw_shape(3, 64.0, 64.0, 20.0, 128)
    half_base = 20 / np.sin(np.pi / 3)
    assert abs(tri.sum() - 2 * half_base * 40 / 2) < 2 * (2 * half_base + 2 * 45)
    assert tri[44:50].sum() < tri[78:84].sum()  # apex up


def test_hard_variant_has_more_and_smaller_objects():
    normal, hard = ShapesDataset(60, seed=4), ShapesDataset(60, seed=4, difficulty="hard")
    n_normal = [len(normal[i][1]["labels"]) for i in range(60)]
    n_hard = [len(hard[i][1]["labels"]) for i in range(60)]
    assert max(n_normal) <= 4 and max(n_hard) <= 8 and np.mean(n_hard) > np.mean(n_normal) + 1.5
    area_normal = np.median(np.concatenate([normal[i][1]["area"] for i in range(60)]))
    area_hard = np.median(np.concatenate([hard[i][1]["area"] for i in range(60)]))
    assert area_hard < area_normal / 2


def test_centre_margin_and_half_size_scale_with_image_size():
    """At 256 px every shape is twice as large as at 128 (areas in 4x the range)."""
    small = np.concatenate([ShapesDataset(40, seed=5)[i][1]["area"] for i in range(40)])
    large = np.concatenate([ShapesDataset(40, image_size=256, seed=5)[i][1]["area"] for i in range(40)])
    assert 3.0 < np.median(large) / np.median(small) < 5.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(3, split="test")
    with pytest.raises(ValueError, match="difficulty"):
        ShapesDataset(3, difficulty="extreme")
    with pytest.raises(IndexError):
        ShapesDataset(3)[3]
