"""RoIAlign: known answers, Numba kernel vs readable reference, gradients, bad input."""

import numpy as np
import pytest
from optional_torch import import_torch, import_torchvision_ops

from tinymrcnn.gradcheck import gradcheck
from tinymrcnn.ops.roi_align import (
    roi_align,
    roi_align_backward,
    roi_align_backward_reference,
    roi_align_levels,
    roi_align_levels_backward,
    roi_align_reference,
    roi_feature_maps,
    roi_sample_points,
)

ARANGE = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
BOX = np.array([[0, 1, 1, 3, 3]], dtype=np.float64)

# docs/semantics.md#roialign, known answers (detectron2's test): 5x5 arange, box [1, 1, 3, 3], 4x4, adaptive
KNOWN = {
    False: [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14], [15, 15.5, 16, 16.5]],
    True: [[4.5, 5, 5.5, 6], [7, 7.5, 8, 8.5], [9.5, 10, 10.5, 11], [12, 12.5, 13, 13.5]],
}


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("fn", [roi_align, roi_align_reference], ids=["numba", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_detectron2_known_answer(fn, aligned, dtype):
    out = fn(ARANGE.astype(dtype), BOX.astype(dtype), (4, 4), spatial_scale=1.0, sampling_ratio=0, aligned=aligned)
    assert out.shape == (1, 1, 4, 4) and out.dtype == dtype
    np.testing.assert_allclose(out[0, 0], KNOWN[aligned], rtol=1e-6)


def test_sample_points_follow_spec():
    # aligned=False, box [1, 1, 3, 3], 4x4 bins of 0.5, adaptive grid ceil(2 / 4) = 1: bin centres
    ys, xs, count = roi_sample_points([1, 1, 3, 3], 4, 1.0, 0, False)
    np.testing.assert_allclose(ys[:, 0], [1.25, 1.75, 2.25, 2.75])
    assert count == 1
    # the implementation samples at (i + 0.5) / grid of a bin
    ys, xs, count = roi_sample_points([0, 0, 6, 6], 3, 1.0, 2, True)
    np.testing.assert_allclose(ys[0], [-0.5 + 0.5, -0.5 + 1.5])
    assert count == 4


def random_case(rng, dtype, n=2, c=3, h=9, w=11, k=24):
    """Feature maps and RoIs of every kind: inside, straddling, outside, tiny, huge,
    zero-size, inverted; batch index per RoI."""
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    scale = 0.5
    b = rng.integers(0, n, k)
    xy = rng.uniform(-4, 2 * w, (k, 2))
    wh = rng.uniform(0.5, 2 * h, (k, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[0] = [4, 4, 10, 12]  # inside
    boxes[1] = [-6, -6, 8, 8]  # straddling the top-left corner
    boxes[2] = [2 * w - 4, 2 * h - 4, 2 * w + 10, 2 * h + 10]  # straddling bottom-right
    boxes[3] = [-40, -40, -20, -20]  # wholly outside
    boxes[4] = [5, 5, 5.05, 5.02]  # tiny
    boxes[5] = [-50, -50, 200, 250]  # huge
    boxes[6] = [6, 6, 6, 6]  # zero size
    boxes[7] = [9, 9, 3, 4]  # inverted
    boxes[8] = [2 * w + 4, 2, 2 * w + 9, 8]  # wholly right of the map
    boxes[9] = [2, 2 * h + 1, 8, 2 * h + 3]  # wholly below it
    rois = np.concatenate([b[:, None], boxes], axis=1).astype(dtype)
    return x, rois, scale


CASES = [(m, a, s) for m in ("avg", "max") for a in (False, True) for s in (2, 0, 1, 3)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode,aligned,sampling", CASES)
def test_numba_matches_reference(dtype, mode, aligned, sampling):
    rng = np.random.default_rng(100 + CASES.index((mode, aligned, sampling)))  # the same data in every run
    x, rois, scale = random_case(rng, dtype)
    out_size = (3, 4)
    y = roi_align(x, rois, out_size, scale, sampling, aligned, mode)
    y_ref = roi_align_reference(x, rois, out_size, scale, sampling, aligned, mode)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, **tol)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = roi_align_backward(dy, x, rois, out_size, scale, sampling, aligned, mode)
    dx_ref = roi_align_backward_reference(dy, x, rois, out_size, scale, sampling, aligned, mode)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, dx_ref, **tol)
    # degenerate boxes: wholly outside gives 0; the zero-size aligned box too
    assert not y[3].any() and not y[8].any() and not y[9].any()
    if aligned and sampling <= 0:
        assert not y[6].any()


def test_prepared_maps_give_the_same_numbers_and_are_reusable():
    rng = np.random.default_rng(0)
    x, rois, scale = random_case(rng, np.float32)
    maps = roi_feature_maps([x])
    assert maps[0].shape == x.shape and roi_feature_maps(maps) is maps
    zeros = np.zeros(len(rois), np.int64)
    for size in (2, (3, 5)):
        np.testing.assert_array_equal(
            roi_align_levels(maps, rois, zeros, [scale], size, 2), roi_align(x, rois, size, scale, 2)
        )
    dy = rng.standard_normal((len(rois), 3, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(
        roi_align_levels_backward(dy, maps, rois, zeros, [scale], 2, 2, mode="max")[0],
        roi_align_backward(dy, x, rois, 2, scale, 2, mode="max"),
    )


def test_empty_rois_and_batch_index():
    x = np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype(np.float32)
    y = roi_align(x, np.zeros((0, 5), np.float32), 7, 0.25, 2)
    assert y.shape == (0, 2, 7, 7)
    dx = roi_align_backward(y, x, np.zeros((0, 5)), 7, 0.25, 2)
    assert dx.shape == x.shape and not dx.any()
    # the batch index picks the image
    rois = np.array([[2, 0, 0, 5, 5], [0, 0, 0, 5, 5]], np.float32)
    y = roi_align(x, rois, 2, 1.0, 2)
    np.testing.assert_array_equal(y[0], roi_align(x[2:3], rois[:1] * [0, 1, 1, 1, 1], 2, 1.0, 2)[0])
    np.testing.assert_array_equal(y[1], roi_align(x[0:1], rois[1:], 2, 1.0, 2)[0])


def test_backward_is_race_free_with_many_overlapping_rois():
    # 300 RoIs on the same few pixels: every thread adds into the same taps
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 64, 12, 12))
    jitter = rng.uniform(-0.3, 0.3, (300, 4))
    rois = np.concatenate([np.zeros((300, 1)), np.array([3, 3, 8, 8]) + jitter], axis=1)
    dy = rng.standard_normal((300, 64, 7, 7))
    for mode in ("avg", "max"):
        ref = roi_align_backward_reference(dy[:, :4], x[:, :4], rois, 7, 1.0, 2, mode=mode)
        for _ in range(3):
            dx = roi_align_backward(dy, x, rois, 7, 1.0, 2, mode=mode)
            np.testing.assert_allclose(dx[:, :4], ref, rtol=1e-12, atol=1e-12)


# --- gradients by finite differences (float64) -------------------------------------
# RoIAlign is linear in x (piecewise linear for max): central differences have no
# truncation error, so a larger step than gradcheck's default only cuts rounding error.
@pytest.mark.parametrize("aligned,sampling", [(False, 2), (True, 0), (True, 3)])
def test_avg_backward_finite_differences(aligned, sampling):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 7, 8))
    rois = np.array([[0, 1.3, 0.7, 9.1, 11.6], [1, -3, -2, 6, 5.5], [1, 10, 9, 17, 15.2], [0, 4, 4, 4.3, 4.9]])
    kw = dict(spatial_scale=0.6, sampling_ratio=sampling, aligned=aligned)
    err = gradcheck(
        lambda x: roi_align(x, rois, (3, 2), **kw),
        [x],
        lambda g: [roi_align_backward(g, x, rois, (3, 2), **kw)],
        h=1e-4,
        max_checks=None,
    )
    assert err[0] < 1e-7


def test_max_backward_finite_differences_away_from_ties():
    rng = np.random.default_rng(2)
    # well-separated values: a 1e-4 step cannot change which sample wins a bin
    x = rng.permutation(2 * 2 * 7 * 8).reshape(2, 2, 7, 8) * 0.1
    rois = np.array([[0, 1.3, 0.7, 9.1, 11.6], [1, 2, 1, 6, 5.5], [1, 0.2, 0.4, 7.7, 6.1]])
    kw = dict(spatial_scale=0.6, sampling_ratio=2, aligned=True, mode="max")
    err = gradcheck(
        lambda x: roi_align(x, rois, (3, 2), **kw),
        [x],
        lambda g: [roi_align_backward(g, x, rois, (3, 2), **kw)],
        h=1e-4,
        max_checks=None,
    )
    assert err[0] < 1e-7


def test_no_gradient_reaches_pixels_no_sample_reads():
    x = np.random.default_rng(0).standard_normal((1, 1, 10, 10))
    rois = np.array([[0, 2, 2, 4, 4]], float)
    dx = roi_align_backward(np.ones((1, 1, 2, 2)), x, rois, 2, 1.0, 2, aligned=True)
    assert dx[0, 0, 5:].sum() == 0 and dx[0, 0, :, 5:].sum() == 0
    np.testing.assert_allclose(dx.sum(), 4.0)  # avg: weights / count sum to 1 per bin


# --- bad input --------------------------------------------------------------------
def test_bad_input_is_a_clear_value_error():
    x = np.zeros((2, 3, 5, 5), np.float32)
    good = np.array([[0, 0, 0, 2, 2]], np.float32)
    with pytest.raises(ValueError, match=r"shape \(K, 5\)"):
        roi_align(x, np.zeros((3, 4), np.float32), 2)
    with pytest.raises(ValueError, match="batch index"):
        roi_align(x, np.array([[2, 0, 0, 2, 2]], np.float32), 2)
    with pytest.raises(ValueError, match="batch index"):
        roi_align(x, np.array([[-1, 0, 0, 2, 2]], np.float32), 2)
    with pytest.raises(ValueError, match="batch index"):
        roi_align(x, np.array([[0.5, 0, 0, 2, 2]], np.float32), 2)
    with pytest.raises(ValueError, match="batch index"):
        roi_align(x, np.array([[np.nan, 0, 0, 2, 2]], np.float32), 2)
    bad = x.copy()
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        roi_align(bad, good, 2)
    bad[1, 2, 3, 4] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        roi_feature_maps([bad])
    with pytest.raises(ValueError, match="NaN or inf"):
        roi_align(x, np.array([[0, np.nan, 0, 2, 2]], np.float32), 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        roi_align(x, np.array([[0, 0, 0, 2, -np.inf]], np.float32), 2)
    with pytest.raises(ValueError, match="4 dimensions"):
        roi_align(x[0], good, 2)
    with pytest.raises(ValueError, match="mode"):
        roi_align(x, good, 2, mode="min")
    with pytest.raises(ValueError, match="output_size"):
        roi_align(x, good, 0)
    with pytest.raises(ValueError, match="float32 or float64"):
        roi_align(x.astype(np.int32), good, 2)
    dy = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="dy has shape"):
        roi_align_backward(np.zeros((2, 3, 2, 2), np.float32), x, good, 2)
    with pytest.raises(ValueError, match="dy has shape"):
        roi_align_backward(dy, x, good, 3)
    with pytest.raises(ValueError, match="4 dimensions"):
        roi_align_backward(dy, x[0], good, 2)
    with pytest.raises(ValueError, match="dtype mismatch"):
        roi_align_backward(dy.astype(np.float64), x, good, 2)


@pytest.mark.torch
def test_matches_torchvision_when_installed():
    torch = import_torch()
    tv_ops = import_torchvision_ops()  # skips when torchvision is installed but broken too
    rng = np.random.default_rng(4)
    x, rois, scale = random_case(rng, np.float64)
    for aligned in (False, True):
        for sampling in (2, 0):
            ours = roi_align(x, rois, (3, 4), scale, sampling, aligned)
            theirs = tv_ops.roi_align(
                torch.from_numpy(x), torch.from_numpy(rois), (3, 4), scale, sampling, aligned
            ).numpy()
            np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10)
