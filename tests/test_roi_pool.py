"""RoI pooling: hand-computed answers, Numba kernel vs reference, gradients, bad input."""

import numpy as np
import pytest
from optional_torch import import_torch, import_torchvision_ops

from tinymrcnn.gradcheck import gradcheck
from tinymrcnn.ops.roi_pool import (
    roi_pool,
    roi_pool_backward,
    roi_pool_backward_reference,
    roi_pool_cells,
    roi_pool_reference,
)

ARANGE = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)


@pytest.mark.parametrize("fn", [roi_pool, roi_pool_reference], ids=["numba", "reference"])
def test_hand_computed_answer(fn):
    # box [1, 1, 3, 3]: start 1, size 3 - 1 + 1 = 3 cells, bin 1.5: rows/cols [1, 3) and [2, 4)
    rois = np.array([[0, 1, 1, 3, 3.0]])
    y = fn(ARANGE, rois, 2, 1.0)
    np.testing.assert_array_equal(y[0, 0], [[12, 13], [17, 18]])
    backward = roi_pool_backward if fn is roi_pool else roi_pool_backward_reference
    dx = backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), ARANGE, rois, 2, 1.0)
    want = np.zeros(25)
    want[[12, 13, 17, 18]] = [1, 2, 3, 4]  # each bin's winner
    np.testing.assert_array_equal(dx.ravel(), want)
    assert roi_pool_cells([1, 1, 3, 3], 2, 1.0, 5, 5) == [[(1, 3, 1, 3), (1, 3, 2, 4)], [(2, 4, 1, 3), (2, 4, 2, 4)]]


def test_rounding_is_half_away_from_zero():
    # x1 = 2.5 rounds to 3 (C's round), not 2 (Python's banker's round)
    y = roi_pool(-ARANGE, np.array([[0, 2.5, 0, 4, 0]]), 1, 1.0)
    assert y[0, 0, 0, 0] == -3.0  # row 0, cols 3..4 (from col 2 it would be -2)
    ((cells,),) = roi_pool_cells([2.5, 0, 4, 0], 1, 1.0, 5, 5)
    assert cells == (0, 1, 3, 5)


def test_empty_bins_give_zero_and_no_gradient():
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    rois = np.array([[0, 40, 40, 60, 60], [0, -30, -30, -20, -20]])  # wholly outside the map
    for fn, backward in ((roi_pool, roi_pool_backward), (roi_pool_reference, roi_pool_backward_reference)):
        assert not fn(x, rois, 3, 1.0).any()
        assert not backward(np.ones((2, 2, 3, 3)), x, rois, 3, 1.0).any()


def random_case(rng, dtype, n=2, c=3, h=9, w=11, k=30):
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    b = rng.integers(0, n, k)
    xy = rng.uniform(-6, 2 * w, (k, 2))
    wh = rng.uniform(0, 2 * h, (k, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[0] = [4, 4, 10, 12]
    boxes[1] = [-6, -6, 8, 8]
    boxes[2] = [-40, -40, -20, -20]
    boxes[3] = [5, 5, 5, 5]
    boxes[4] = [-50, -50, 200, 250]
    boxes[5] = [9, 9, 3, 4]
    boxes[6] = [2, 2, 8, 2]  # zero height
    boxes[7] = [1, 1, 2.5, 3.5]  # exact halves
    return x, np.concatenate([b[:, None], boxes], axis=1).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("out_size", [2, (3, 4), 7])
def test_numba_matches_reference(dtype, out_size):
    rng = np.random.default_rng(7)
    x, rois = random_case(rng, dtype)
    y = roi_pool(x, rois, out_size, 0.5)
    y_ref = roi_pool_reference(x, rois, out_size, 0.5)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = roi_pool_backward(dy, x, rois, out_size, 0.5)
    np.testing.assert_allclose(
        dx, roi_pool_backward_reference(dy, x, rois, out_size, 0.5), rtol=1e-6 if dtype == np.float32 else 1e-13
    )


def test_zero_rois():
    x = np.zeros((1, 2, 4, 4), np.float32)
    rois = np.zeros((0, 5), np.float32)
    y = roi_pool(x, rois, 7)
    assert y.shape == (0, 2, 7, 7)
    dx = roi_pool_backward(y, x, rois, 7)
    assert dx.shape == x.shape and not dx.any()


def test_backward_finite_differences_away_from_ties():
    rng = np.random.default_rng(1)
    # distinct values at least 0.1 apart: a small step cannot change any bin's argmax
    x = rng.permutation(2 * 2 * 8 * 9).reshape(2, 2, 8, 9) * 0.1
    rois = np.array([[0, 1.3, 0.7, 15.1, 13.6], [1, -3, -2, 9, 7.5], [1, 6, 6, 17, 15.2], [0, 4, 4, 4.3, 4.9]])
    err = gradcheck(
        lambda x: roi_pool(x, rois, (3, 2), 0.5),
        [x],
        lambda g: [roi_pool_backward(g, x, rois, (3, 2), 0.5)],
        h=1e-4,
        max_checks=None,
    )
    assert err[0] < 1e-7


def test_backward_is_race_free_with_overlapping_rois():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 32, 10, 10))
    rois = np.concatenate([np.zeros((200, 1)), rng.uniform(2, 4, (200, 2)), rng.uniform(6, 8, (200, 2))], axis=1)
    dy = rng.standard_normal(roi_pool(x, rois, 3).shape)
    ref = roi_pool_backward_reference(dy, x, rois, 3)
    for _ in range(3):
        np.testing.assert_allclose(roi_pool_backward(dy, x, rois, 3), ref, rtol=1e-12)


def test_bad_input_is_a_clear_value_error():
    x = np.zeros((2, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"shape \(K, 5\)"):
        roi_pool(x, np.zeros((1, 4)), 2)
    with pytest.raises(ValueError, match="batch index"):
        roi_pool(x, np.array([[5, 0, 0, 1, 1.0]]), 2)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        roi_pool(bad, np.array([[0, 0, 0, 1, 1.0]]), 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        roi_pool(x, np.array([[0, np.nan, 0, 1, 1.0]]), 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        roi_pool(x, np.array([[0, 0, 0, np.inf, 1.0]]), 2)
    rois = np.array([[0, 0, 0, 4, 4.0]])
    y = roi_pool(x, rois, 2)
    with pytest.raises(ValueError, match="dy has shape"):
        roi_pool_backward(y[:, :, :1], x, rois, 2)
    with pytest.raises(ValueError, match="dtype mismatch"):
        roi_pool_backward(y.astype(np.float64), x, rois, 2)


@pytest.mark.torch
def test_matches_torchvision_when_installed():
    torch = import_torch()
    tv_ops = import_torchvision_ops()  # skips when torchvision is installed but broken too
    rng = np.random.default_rng(4)
    x, rois = random_case(rng, np.float64)
    rois = rois[np.isfinite(rois).all(axis=1)]
    ours = roi_pool(x, rois, (3, 4), 0.5)
    theirs = tv_ops.roi_pool(torch.from_numpy(x), torch.from_numpy(rois), (3, 4), 0.5).numpy()
    np.testing.assert_allclose(ours, theirs)
