"""Flip and resize of (image, target) pairs."""

import numpy as np
import pytest

from tinymrcnn.data import ShapesDataset
from tinymrcnn.data.segmentation import masks_to_boxes
from tinymrcnn.data.transforms import Compose, RandomHorizontalFlip, Resize, hflip, random_horizontal_flip, resize


def _target(masks):
    masks = np.asarray(masks, np.uint8)
    return {
        "boxes": masks_to_boxes(masks),
        "labels": np.arange(1, len(masks) + 1),
        "masks": masks,
        "area": masks.sum(axis=(1, 2)).astype(np.float32),
        "image_id": 7,
    }


def test_hflip_moves_image_boxes_and_masks_together():
    ds = ShapesDataset(10, seed=1)
    for i in range(len(ds)):
        image, t = ds[i]
        before = {k: np.copy(v) for k, v in t.items()}
        fi, ft = hflip(image, t)
        np.testing.assert_array_equal(fi, image[:, :, ::-1])
        np.testing.assert_array_equal(ft["masks"], t["masks"][:, :, ::-1])
        np.testing.assert_array_equal(ft["boxes"], masks_to_boxes(ft["masks"]))  # still tight
        assert ft["boxes"].dtype == np.float32 and fi.flags.c_contiguous and ft["masks"].flags.c_contiguous
        assert ft["labels"] is t["labels"] and ft["image_id"] == t["image_id"]
        for k, v in before.items():  # input untouched
            np.testing.assert_array_equal(t[k], v)
        ri, rt = hflip(fi, ft)
        np.testing.assert_array_equal(ri, image)
        np.testing.assert_array_equal(rt["boxes"], t["boxes"])


def test_random_flip_probability_and_determinism():
    image = np.arange(12, dtype=np.float32).reshape(1, 3, 4).repeat(3, axis=0)
    t = _target([np.eye(3, 4)])

    def flips(p, seed, n=400):
        rng = np.random.default_rng(seed)
        return [random_horizontal_flip(image, t, rng, p=p)[0][0, 0, 0] != 0 for _ in range(n)]

    assert not any(flips(0.0, 0)) and all(flips(1.0, 0))
    assert flips(0.5, 3) == flips(0.5, 3)
    assert 0.4 < np.mean(flips(0.5, 4)) < 0.6
    a = RandomHorizontalFlip(1.0)(image, t, np.random.default_rng(0))
    np.testing.assert_array_equal(a[0], image[:, :, ::-1])


def test_bilinear_resize_matches_pytorch_known_values():
    """F.interpolate(x, size, mode="bilinear", align_corners=False) on small inputs."""
    x = np.array([[1, 2], [3, 4]], np.float32)[None].repeat(3, axis=0)
    up, _ = resize(x, _target(np.zeros((0, 2, 2))), (4, 4))
    np.testing.assert_allclose(
        up[0], [[1.0, 1.25, 1.75, 2.0], [1.5, 1.75, 2.25, 2.5], [2.5, 2.75, 3.25, 3.5], [3.0, 3.25, 3.75, 4.0]]
    )
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    down, _ = resize(x, _target(np.zeros((0, 4, 4))), (2, 2))
    np.testing.assert_allclose(down[0], [[2.5, 4.5], [10.5, 12.5]])
    assert up.dtype == np.float32


def test_resize_targets_nearest_masks_scaled_boxes():
    mask = np.zeros((4, 6), np.uint8)
    mask[1:3, 2:5] = 1
    image = np.zeros((3, 4, 6), np.float32)
    t = _target([mask])
    ri, rt = resize(image, t, (8, 12))
    assert ri.shape == (3, 8, 12) and rt["masks"].shape == (1, 8, 12) and rt["masks"].dtype == np.uint8
    expected = np.zeros((8, 12), np.uint8)
    expected[2:6, 4:10] = 1  # nearest: src = floor(dst * in / out)
    np.testing.assert_array_equal(rt["masks"][0], expected)
    np.testing.assert_array_equal(rt["boxes"], [[4, 2, 10, 6]])  # per-axis ratio 2, 2
    assert rt["area"][0] == 4 * t["area"][0]
    same_i, same_t = resize(image, t, (4, 6))
    assert same_i is image and same_t is t


def test_resize_rule_short_side_capped_by_long_side():
    image = np.zeros((3, 100, 300), np.float32)
    t = _target([np.pad(np.ones((10, 30), np.uint8), ((45, 45), (135, 135)))])
    ri, rt = Resize(200, 400)(image, t)
    assert ri.shape == (3, 133, 400)  # scale min(200/100, 400/300) = 4/3
    np.testing.assert_allclose(rt["boxes"], t["boxes"] * np.array([400 / 300, 133 / 100] * 2), rtol=1e-6)
    ri, _ = Resize(256)(np.zeros((3, 128, 128), np.float32), _target(np.zeros((0, 128, 128))))
    assert ri.shape == (3, 256, 256)


def test_compose_draws_from_one_generator():
    ds = ShapesDataset(4, seed=2)
    pipeline = Compose([RandomHorizontalFlip(0.5), Resize(64)])
    for i in range(len(ds)):
        image, t = ds[i]
        a = pipeline(image, t, np.random.default_rng(i))
        b = pipeline(image, t, np.random.default_rng(i))
        np.testing.assert_array_equal(a[0], b[0])
        assert a[0].shape == (3, 64, 64) and a[1]["masks"].shape[1:] == (64, 64)
    assert "RandomHorizontalFlip" in repr(pipeline)


@pytest.mark.torch
def test_resize_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.random((3, 37, 53)).astype(np.float32)
    masks = (rng.random((2, 37, 53)) > 0.5).astype(np.uint8)
    for size in ((74, 106), (20, 31), (50, 50)):
        ours_i, ours_t = resize(x, _target(masks), size)
        ref_i = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False
        )[0].numpy()
        ref_m = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=size)[:, 0].byte()
        # torch computes the sample positions in float32, we in float64: positions near 50 differ by
        # up to one float32 ulp (4e-6), so values in [0, 1] may differ by that much
        np.testing.assert_allclose(ours_i, ref_i, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(ours_t["masks"], ref_m.numpy())
