"""NMS: the Numba kernel against the readable reference, and the semantics on hand-built cases."""

import numpy as np
import pytest

from tinymrcnn.ops import batched_nms, box_iou, nms
from tinymrcnn.ops.nms import batched_nms_reference, nms_reference


def random_set(rng, dtype):
    """A small random box set with the awkward cases mixed in: ties, duplicates, zero areas."""
    n = int(rng.integers(0, 25))
    xy = rng.integers(0, 12, (n, 2)).astype(np.float64)  # a small integer grid: many exact IoUs
    wh = rng.integers(0, 6, (n, 2)).astype(np.float64)  # 0 gives zero-area boxes
    if rng.random() < 0.5:
        xy, wh = xy + rng.random((n, 2)), wh + rng.random((n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    if n > 1 and rng.random() < 0.5:  # identical boxes
        boxes[rng.integers(0, n, n // 3)] = boxes[rng.integers(0, n)]
    scores = rng.integers(0, 4, n).astype(np.float64) if rng.random() < 0.5 else rng.random(n)  # ties
    return boxes.astype(dtype), scores.astype(dtype)


def test_nms_equals_reference_on_2000_random_sets():
    rng = np.random.default_rng(0)
    for trial in range(2000):
        dtype = np.float32 if trial % 2 else np.float64
        boxes, scores = random_set(rng, dtype)
        thr = float(rng.choice([0.0, 0.1, 0.3, 0.5, 0.7, 1.0, rng.random()]))
        keep = nms(boxes, scores, thr)
        assert keep.dtype == np.int64
        np.testing.assert_array_equal(keep, nms_reference(boxes, scores, thr), err_msg=f"trial {trial}")
        idxs = rng.integers(0, 3, boxes.shape[0])
        np.testing.assert_array_equal(
            batched_nms(boxes, scores, idxs, thr),
            batched_nms_reference(boxes, scores, idxs, thr),
            err_msg=f"trial {trial}",
        )


def test_reference_is_the_greedy_definition():
    """Check the reference itself: kept boxes are sorted, pairwise below the threshold within a
    class, and every dropped box overlaps an earlier-kept box of its class above the threshold."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        boxes, scores = random_set(rng, np.float64)
        idxs = rng.integers(0, 2, boxes.shape[0])
        keep = batched_nms_reference(boxes, scores, idxs, 0.5)
        assert (np.diff(scores[keep]) <= 0).all()
        iou = box_iou(boxes, boxes)
        same = idxs[:, None] == idxs[None, :]
        kk = np.ix_(keep, keep)
        assert not ((iou[kk] > 0.5) & same[kk] & ~np.eye(keep.size, dtype=bool)).any()
        order = np.argsort(-scores, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        for d in np.setdiff1d(np.arange(boxes.shape[0]), keep):
            earlier = keep[rank[keep] < rank[d]]
            assert ((iou[d, earlier] > 0.5) & same[d, earlier]).any()


def test_known_outcome_and_strict_threshold():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # 0: best
            [1, 0, 11, 10],  # 1: IoU 90/110 = 0.818 with 0 -> dropped
            [20, 20, 30, 30],  # 2: disjoint -> kept
            [0, 0, 10, 5],
        ],  # 3: IoU exactly 0.5 with 0
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.3, 0.5], np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.7), [0, 3, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [0, 3, 2])  # 0.5 > 0.5 is false: kept
    np.testing.assert_array_equal(nms(boxes, scores, 0.49), [0, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 1.0), [0, 1, 3, 2])  # nothing exceeds IoU 1
    np.testing.assert_array_equal(nms(boxes, scores, 0.0), [0, 2])


def test_ties_keep_input_order_and_identical_boxes_keep_the_first():
    boxes = np.array([[0, 0, 4, 4]] * 3 + [[10, 10, 12, 12]], np.float64)
    scores = np.array([0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [0, 3])
    np.testing.assert_array_equal(nms(boxes[::-1].copy(), scores, 0.5), [0, 1])
    np.testing.assert_array_equal(nms(boxes, np.array([0.1, 0.5, 0.5, 0.2]), 0.5), [1, 3])


def test_zero_area_boxes_neither_suppress_nor_get_suppressed():
    boxes = np.array([[0, 0, 10, 10], [2, 2, 2, 8], [2, 2, 2, 8], [3, 3, 3, 3]], np.float32)
    scores = np.array([0.1, 0.9, 0.8, 0.7], np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.0), [1, 2, 3, 0])


def test_batched_nms_suppresses_only_within_a_group():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    idxs = np.array([0, 1, 0, 1])
    np.testing.assert_array_equal(batched_nms(boxes, scores, idxs, 0.5), [3, 0])
    np.testing.assert_array_equal(batched_nms(boxes, scores, np.array([0, 1, 2, 3]), 0.5), [3, 0, 1, 2])


def test_empty_input():
    for f in (
        lambda b, s: nms(b, s, 0.5),
        lambda b, s: nms_reference(b, s, 0.5),
        lambda b, s: batched_nms(b, s, np.zeros(0, np.int64), 0.5),
    ):
        keep = f(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        assert keep.shape == (0,) and keep.dtype == np.int64


@pytest.mark.parametrize(
    "args",
    [
        (np.array([[0, 0, np.nan, 1.0]]), np.ones(1), 0.5),
        (np.zeros((2, 4)), np.array([0.5, np.nan]), 0.5),
        (np.zeros((2, 3)), np.ones(2), 0.5),
        (np.zeros((2, 4)), np.ones(3), 0.5),
        (np.zeros((2, 4)), np.ones((2, 1)), 0.5),
        (np.array([[2.0, 0, 1, 1]]), np.ones(1), 0.5),
        (np.zeros((2, 4)), np.ones(2), float("nan")),
        (np.zeros((2, 4)), np.ones(2), 1.5),
        (np.zeros((2, 4)), np.ones(2), -0.1),
    ],
)
def test_bad_input_raises_value_error(args):
    with pytest.raises(ValueError):
        nms(*args)
    with pytest.raises(ValueError):
        nms_reference(*args)


def test_batched_nms_bad_idxs():
    boxes, scores = np.zeros((2, 4)), np.ones(2)
    for idxs in (np.zeros(3, np.int64), np.zeros(2, np.float64), np.zeros((2, 1), np.int64)):
        with pytest.raises(ValueError):
            batched_nms(boxes, scores, idxs, 0.5)


def test_kernel_threshold_rounding_keeps_the_strict_comparison_exact():
    """The kernel compares a float32 IoU with the threshold rounded down to float32; that must
    decide exactly as comparing with the float64 threshold (as the reference and torchvision do)."""
    from tinymrcnn.ops.nms import _kernel_threshold

    rng = np.random.default_rng(0)
    for thr in np.concatenate([[0.3, 0.5, 0.7, 0.1, 1.0, 0.0], rng.random(200)]):
        t32 = _kernel_threshold(float(thr), np.dtype(np.float32))
        assert t32.dtype == np.float32 and t32 <= thr
        near = np.float32(thr) + np.arange(-3, 4, dtype=np.float32) * np.spacing(np.float32(thr))
        np.testing.assert_array_equal(near > t32, near.astype(np.float64) > thr)
