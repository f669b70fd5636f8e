"""The proposal layer (step by step on a hand-built case, and against a per-level re-derivation)
and the anchor target layer."""

import numpy as np
import pytest
from scipy.special import expit

from tinymrcnn.model.anchors import AnchorGenerator
from tinymrcnn.model.matcher import BalancedPositiveNegativeSampler, Matcher
from tinymrcnn.model.proposals import PROPOSAL_STAGES, assign_rpn_targets, generate_proposals
from tinymrcnn.ops import BoxCoder, clip_boxes_to_image
from tinymrcnn.ops.nms import nms_reference


def hand_case():
    level0 = np.array(
        [
            [0, 0, 10, 10],  # A0 logit 3.0: the best box
            [1, 0, 11, 10],  # A1 logit 2.0: IoU 0.82 with A0 -> NMS drops it
            [20, 20, 20.0005, 30],  # A2 logit 1.5: width 5e-4 < 1e-3 -> removed as small
            [30, 30, 40, 40],  # A3 logit 0.0: probability 0.5 < 0.55 -> score threshold
            [35, 35, 60, 60],  # A4 logit 0.5: clipped to the 50 x 50 image
            [5, 5, 15, 15],
        ],  # A5 logit -5: not in the top 5 of its level
        np.float32,
    )
    level1 = np.array(
        [
            [0, 0, 10, 10],  # B0 logit 1.0: same box as A0 but another level: kept
            [0, 1, 10, 11],
        ],  # B1 logit 0.8: IoU 0.82 with B0 -> NMS drops it
        np.float32,
    )
    logits = [np.array([[3.0, 2.0, 1.5, 0.0, 0.5, -5.0]], np.float32), np.array([[1.0, 0.8]], np.float32)]
    deltas = [np.zeros((1, 6, 4), np.float32), np.zeros((1, 2, 4), np.float32)]
    return logits, deltas, [level0, level1]


def test_hand_built_case_step_by_step():
    logits, deltas, anchors = hand_case()
    boxes, scores, records = generate_proposals(
        logits,
        deltas,
        anchors,
        [(50, 50)],
        pre_nms_top_n=5,
        post_nms_top_n=2,
        nms_thresh=0.7,
        score_thresh=0.55,
        trace=True,
    )
    rec = records[0]
    assert rec["counts"] == {
        "topk": 7,
        "decoded": 7,
        "clipped": 7,
        "remove_small": 6,
        "score_thresh": 5,
        "nms": 3,
        "final": 2,
    }
    assert rec["num_anchors_per_level"] == [6, 2]
    # top-k keeps the level order, best first within a level; anchor_index runs over both levels
    np.testing.assert_array_equal(rec["topk"]["anchor_index"], [0, 1, 2, 4, 3, 6, 7])
    np.testing.assert_array_equal(rec["topk"]["levels"], [0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(rec["topk"]["logits"], np.float32([3.0, 2.0, 1.5, 0.5, 0.0, 1.0, 0.8]))
    np.testing.assert_array_equal(rec["decoded"]["boxes"][3], [35, 35, 60, 60])
    np.testing.assert_array_equal(rec["clipped"]["boxes"][3], [35, 35, 50, 50])
    np.testing.assert_array_equal(rec["remove_small"]["anchor_index"], [0, 1, 4, 3, 6, 7])
    np.testing.assert_array_equal(rec["score_thresh"]["anchor_index"], [0, 1, 4, 6, 7])
    # NMS per level, then everything in decreasing score
    np.testing.assert_array_equal(rec["nms"]["anchor_index"], [0, 6, 4])
    np.testing.assert_array_equal(rec["nms"]["levels"], [0, 1, 0])
    np.testing.assert_array_equal(rec["final"]["anchor_index"], [0, 6])
    np.testing.assert_array_equal(boxes[0], [[0, 0, 10, 10], [0, 0, 10, 10]])
    np.testing.assert_allclose(scores[0], expit(np.float32([3.0, 1.0])), rtol=1e-6)
    assert boxes[0].dtype == np.float32 and scores[0].dtype == np.float32
    for name in PROPOSAL_STAGES:
        stage = rec[name]
        assert all(len(v) == rec["counts"][name] for v in stage.values())


def test_defaults_keep_everything_but_the_small_and_the_overlapping():
    logits, deltas, anchors = hand_case()
    boxes, scores, records = generate_proposals(logits, deltas, anchors, [(50, 50)], 2000, 2000, trace=True)
    np.testing.assert_array_equal(records[0]["final"]["anchor_index"], [0, 6, 4, 3, 5])
    assert (np.diff(scores[0]) <= 0).all()


def proposals_by_hand(logits, deltas, anchors, size, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size):
    """One level at a time with the reference NMS, then a stable sort over the levels."""
    boxes, scores = [], []
    coder = BoxCoder()
    for obj, dlt, anc in zip(logits, deltas, anchors):
        top = np.argsort(-obj, kind="stable")[:pre_nms_top_n]
        b = clip_boxes_to_image(coder.decode(dlt[top], anc[top]), size)
        s = expit(obj[top])
        ok = (b[:, 2] - b[:, 0] >= min_size) & (b[:, 3] - b[:, 1] >= min_size) & (s >= score_thresh)
        b, s = b[ok], s[ok]
        keep = nms_reference(b, s, nms_thresh)
        boxes.append(b[keep])
        scores.append(s[keep])
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    order = np.argsort(-scores, kind="stable")[:post_nms_top_n]
    return boxes[order], scores[order]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_batch_equals_per_level_derivation(dtype):
    rng = np.random.default_rng(0)
    gen = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    anchors = gen.anchors_per_level((64, 64), [(16, 16), (8, 8), (4, 4)])
    sizes = [(60, 64), (64, 50)]
    logits = [rng.normal(0, 2, (2, a.shape[0])).astype(dtype) for a in anchors]
    deltas = [rng.normal(0, 0.3, (2, a.shape[0], 4)).astype(dtype) for a in anchors]
    args = dict(pre_nms_top_n=100, post_nms_top_n=60, nms_thresh=0.6, score_thresh=0.2, min_size=3.0)
    boxes, scores, records = generate_proposals(logits, deltas, anchors, sizes, **args, trace=True)
    for i in range(2):
        exp_boxes, exp_scores = proposals_by_hand(
            [o[i] for o in logits], [d[i] for d in deltas], [a.astype(dtype) for a in anchors], sizes[i], **args
        )
        np.testing.assert_array_equal(boxes[i], exp_boxes)
        np.testing.assert_array_equal(scores[i], exp_scores)
        assert boxes[i].dtype == dtype
        rec = records[i]
        counts = [rec["counts"][s] for s in PROPOSAL_STAGES]
        assert counts[0] == 100 + 100 + 48 and counts == sorted(counts, reverse=True)
        assert counts[-1] == 60 and counts[-3] > counts[-2] > 60  # every filter bites here
        np.testing.assert_array_equal(rec["topk"]["boxes"], np.concatenate(anchors)[rec["topk"]["anchor_index"]])
        assert boxes[i][:, 2].max() <= sizes[i][1] and boxes[i][:, 3].max() <= sizes[i][0]


def test_proposals_bad_input():
    logits, deltas, anchors = hand_case()
    with pytest.raises(ValueError):  # deltas of the wrong length
        generate_proposals(logits, [deltas[0][:, :5], deltas[1]], anchors, [(50, 50)], 10, 10)
    with pytest.raises(ValueError):  # two image sizes for a batch of one
        generate_proposals(logits, deltas, anchors, [(50, 50)] * 2, 10, 10)
    with pytest.raises(ValueError):  # NaN logits
        generate_proposals([np.full((1, 6), np.nan), logits[1]], deltas, anchors, [(50, 50)], 10, 10)
    with pytest.raises(ValueError):
        generate_proposals(logits, deltas, anchors, [(50, 50)], -1, 10)
    with pytest.raises(ValueError):
        generate_proposals(logits[:1], deltas, anchors, [(50, 50)], 10, 10)


def rpn_layers():
    return Matcher(0.7, 0.3, True), BalancedPositiveNegativeSampler(256, 0.5), BoxCoder()


def test_assign_rpn_targets_hand_case():
    anchors = np.array(
        [
            [0, 0, 10, 10],  # IoU 1 with GT 0 -> positive
            [0, 0, 10, 9],  # IoU 0.9 -> positive
            [0, 0, 10, 5],  # IoU 0.5 -> ignored
            [50, 50, 60, 60],  # IoU 0 -> negative
            [100, 100, 110, 110],  # IoU 0.25 with GT 1, its best -> low-quality positive
            [115, 115, 125, 125],
        ],  # IoU 25/475 with GT 1 -> negative
        np.float32,
    )
    gt = np.array([[0, 0, 10, 10], [100, 100, 120, 120]], np.float32)
    labels, targets = assign_rpn_targets(anchors, gt, *rpn_layers(), rng=np.random.default_rng(0))
    np.testing.assert_array_equal(labels, [1, 1, -1, 0, 1, 0])
    assert labels.dtype == np.int64 and targets.dtype == np.float32
    expected = BoxCoder().encode(gt[[0, 0, 1]], anchors[[0, 1, 4]])
    np.testing.assert_allclose(targets[[0, 1, 4]], expected, rtol=1e-6)
    np.testing.assert_array_equal(targets[[2, 3, 5]], 0)
    np.testing.assert_allclose(targets[4], [0.5, 0.5, np.log(2), np.log(2)], rtol=1e-6)


def test_assign_rpn_targets_samples_at_most_256_and_half_positive():
    rng = np.random.default_rng(0)
    gen = AnchorGenerator(sizes=((16,),), aspect_ratios=((0.5, 1.0, 2.0),))
    (anchors,) = gen.anchors_per_level((128, 128), [(32, 32)])
    gt = np.array([[10, 10, 40, 30], [60, 60, 100, 120], [0, 0, 128, 128]], np.float32)
    gt = np.concatenate([gt] + [gt + 2 * k for k in range(1, 30)])  # many overlapping GT: many positives
    labels, targets = assign_rpn_targets(anchors, gt, *rpn_layers(), rng=rng)
    assert (labels == 1).sum() == 128 and (labels == 0).sum() == 128
    assert (targets[labels != 1] == 0).all() and (targets[labels == 1] != 0).any()
    again = assign_rpn_targets(anchors, gt, *rpn_layers(), rng=np.random.default_rng(0))[0]
    np.testing.assert_array_equal(labels, again)


@pytest.mark.parametrize(
    "gt", [np.zeros((0, 4), np.float32), np.array([[5, 5, 5, 20], [30, 30, 30, 30]], np.float32)]
)  # zero-area GT
def test_assign_rpn_targets_without_usable_gt_gives_only_negatives(gt):
    (anchors,) = AnchorGenerator(((16,),), ((1.0,),)).anchors_per_level((128, 128), [(32, 32)])
    labels, targets = assign_rpn_targets(anchors, gt, *rpn_layers(), rng=np.random.default_rng(0))
    assert (labels == 0).sum() == 256 and (labels == 1).sum() == 0 and (labels == -1).sum() == 1024 - 256
    assert not targets.any()


def test_assign_rpn_targets_rejects_inverted_gt():
    anchors = np.array([[0, 0, 10, 10]], np.float32)
    with pytest.raises(ValueError):
        assign_rpn_targets(anchors, np.array([[10, 0, 0, 10]], np.float32), *rpn_layers(), rng=np.random.default_rng(0))


def test_trace_only_when_asked_and_the_same_proposals():
    logits, deltas, anchors = hand_case()
    boxes, scores, records = generate_proposals(logits, deltas, anchors, [(50, 50)], 4, 3)
    traced_boxes, traced_scores, traced = generate_proposals(logits, deltas, anchors, [(50, 50)], 4, 3, trace=True)
    assert records is None and traced[0]["counts"]["final"] == len(boxes[0]) > 0
    np.testing.assert_array_equal(boxes[0], traced_boxes[0])
    np.testing.assert_array_equal(scores[0], traced_scores[0])
    np.testing.assert_array_equal(traced[0]["final"]["boxes"], boxes[0])
