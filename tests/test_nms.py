"""NMS: the Numba kernel against the readable reference, and the semantics on hand-built cases."""

import numpy as np
import pytest

from tinymrcnn.ops import batched_nms, box_iou, nms
from tinymrcnn.ops.nms import batched_nms_reference, decay_across_classes, nms_reference


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


def decay_by_hand(boxes, scores, labels, thr, factor):
    """The cross-class decay as a loop over pairs: i is decayed when some j of another label outranks it
    (higher score, or equal score and earlier) and overlaps it by IoU > thr."""
    out = scores.copy()
    for i in range(len(scores)):
        for j in range(len(scores)):
            outranks = scores[j] > scores[i] or (scores[j] == scores[i] and j < i)
            iou = box_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0]
            if outranks and labels[j] != labels[i] and float(iou) > thr:
                out[i] = scores[i] * scores.dtype.type(factor)
                break
    return out


def test_decay_across_classes_equals_the_pairwise_loop_on_500_random_sets():
    rng = np.random.default_rng(1)
    for trial in range(500):
        dtype = np.float32 if trial % 2 else np.float64
        boxes, scores = random_set(rng, dtype)
        labels = rng.integers(1, 4, boxes.shape[0])
        thr = float(rng.choice([0.0, 0.5, 0.7, rng.random()]))
        factor = float(rng.choice([0.0, 0.2, 1.0, rng.random()]))
        got = decay_across_classes(boxes, scores, labels, thr, factor)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, decay_by_hand(boxes, scores, labels, thr, factor), err_msg=f"trial {trial}")


def test_decay_across_classes_known_outcome():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # 0: square, 0.9
            [2, 0, 12, 10],  # 1: circle on the same object (IoU 2/3 with 0), 0.6 -> decayed by 0
            [0, 0, 10, 5],  # 2: circle, IoU exactly 0.5 with 0: not strictly greater -> kept
            [20, 20, 30, 30],  # 3: circle far away -> kept
            [20, 20, 30, 30],  # 4: triangle, same score as 3 but later in the input -> decayed by 3
            [4, 0, 14, 10],  # 5: triangle, 0.5: IoU 0.43 with 0, 2/3 with 1 -> decayed by 1, decayed itself
        ],
        np.float64,
    )
    scores = np.array([0.9, 0.6, 0.8, 0.4, 0.4, 0.5])
    labels = np.array([1, 2, 2, 2, 3, 3])
    got = decay_across_classes(boxes, scores, labels, 0.5, 0.25)
    np.testing.assert_array_equal(got, [0.9, 0.15, 0.8, 0.4, 0.1, 0.125])
    np.testing.assert_array_equal(decay_across_classes(boxes, scores, labels, 0.5, 1.0), scores)
    same_label = decay_across_classes(boxes, scores, np.ones(6, np.int64), 0.5, 0.25)
    np.testing.assert_array_equal(same_label, scores)  # only another class decays a detection


def test_decay_across_classes_empty_and_bad_input():
    got = decay_across_classes(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), 0.5, 0.2)
    assert got.shape == (0,) and got.dtype == np.float32
    boxes, scores, labels = np.zeros((2, 4)), np.ones(2), np.ones(2, np.int64)
    for factor in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="factor"):
            decay_across_classes(boxes, scores, labels, 0.5, factor)
    with pytest.raises(ValueError, match="labels must be a 1-d array"):
        decay_across_classes(boxes, scores, np.ones(3, np.int64), 0.5, 0.2)
