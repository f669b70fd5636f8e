"""Matcher thresholds and low-quality matches; the balanced sampler's counts and seeding."""

import numpy as np
import pytest

from tinymrcnn.model.matcher import BalancedPositiveNegativeSampler, Matcher

BG, IGNORE = Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS


def test_thresholds_are_inclusive_from_below():
    iou = np.array([[0.7, 0.69, 0.3, 0.29, 0.0, 0.9], [0.1, 0.1, 0.1, 0.1, 0.0, 0.95]])
    m = Matcher(0.7, 0.3, allow_low_quality_matches=False)
    np.testing.assert_array_equal(m(iou), [0, IGNORE, IGNORE, BG, BG, 1])
    assert m(iou).dtype == np.int64
    assert (BG, IGNORE) == (-1, -2)


def test_best_gt_wins_and_first_gt_on_ties():
    iou = np.array([[0.8, 0.75, 0.9], [0.85, 0.75, 0.1]])
    np.testing.assert_array_equal(Matcher(0.5, 0.5)(iou), [1, 0, 0])


def test_low_quality_matches_include_ties_and_keep_each_prediction_best_gt():
    iou = np.array(
        [
            [0.4, 0.4, 0.1, 0.0, 0.0],  # GT 0 best 0.4, reached by predictions 0 and 1 (a tie)
            [0.0, 0.5, 0.2, 0.0, 0.0],  # GT 1 best 0.5 at prediction 1, which GT 0 also claims
            [0.0, 0.0, 0.0, 0.9, 0.2],  # GT 2 well matched
        ]
    )
    np.testing.assert_array_equal(Matcher(0.7, 0.3, False)(iou), [IGNORE, IGNORE, BG, 2, BG])
    # prediction 1's own best GT is 1 (0.5 > 0.4), so it points at GT 1 as in torchvision
    np.testing.assert_array_equal(Matcher(0.7, 0.3, True)(iou), [0, 1, BG, 2, BG])


def test_gt_overlapping_nothing_claims_nothing():
    iou = np.array([[0.0, 0.0, 0.0], [0.1, 0.8, 0.0]])
    np.testing.assert_array_equal(Matcher(0.7, 0.3, True)(iou), [BG, 1, BG])


def test_empty_gt_and_empty_predictions():
    m = Matcher(0.7, 0.3, True)
    np.testing.assert_array_equal(m(np.zeros((0, 4))), [BG] * 4)
    assert m(np.zeros((3, 0))).shape == (0,)


def test_matcher_bad_input():
    with pytest.raises(ValueError):
        Matcher(0.3, 0.7)
    with pytest.raises(ValueError):
        Matcher(0.7, 0.3)(np.array([[np.nan, 0.5]]))
    with pytest.raises(ValueError):
        Matcher(0.7, 0.3)(np.zeros(4))


def labels_with(rng, num_pos, num_neg, num_ignore, pos_value=1):
    labels = np.array([pos_value] * num_pos + [0] * num_neg + [-1] * num_ignore, np.int64)
    return labels[rng.permutation(labels.size)]


@pytest.mark.parametrize(
    "num_pos, num_neg, expect_pos, expect_neg",
    [
        (10, 1000, 10, 246),  # few positives: negatives fill the batch
        (500, 1000, 128, 128),  # the positive fraction caps the positives
        (500, 20, 128, 20),  # few negatives: the batch stays short
        (0, 1000, 0, 256),  # an image without objects
        (0, 0, 0, 0),
    ],
)
def test_sampler_counts(num_pos, num_neg, expect_pos, expect_neg):
    rng = np.random.default_rng(0)
    labels = labels_with(rng, num_pos, num_neg, 300)
    pos, neg = BalancedPositiveNegativeSampler(256, 0.5)(labels, rng)
    assert pos.dtype == bool and pos.shape == labels.shape
    assert (pos.sum(), neg.sum()) == (expect_pos, expect_neg)
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()  # ignored labels are never drawn


def test_sampler_class_ids_count_as_positive_and_fraction_rounds_down():
    rng = np.random.default_rng(0)
    labels = labels_with(rng, 300, 1000, 0, pos_value=7)
    pos, neg = BalancedPositiveNegativeSampler(10, 0.25)(labels, rng)
    assert (pos.sum(), neg.sum()) == (2, 8)


def test_sampler_is_seeded_by_the_generator():
    labels = labels_with(np.random.default_rng(0), 400, 4000, 100)
    sampler = BalancedPositiveNegativeSampler(256, 0.5)
    a = sampler(labels, np.random.default_rng(42))
    b = sampler(labels, np.random.default_rng(42))
    c = sampler(labels, np.random.default_rng(43))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[0] != c[0]).any() and (a[1] != c[1]).any()


def test_sampler_draws_uniformly():
    labels = np.array([1] * 4 + [0] * 4, np.int64)
    rng = np.random.default_rng(0)
    sampler = BalancedPositiveNegativeSampler(4, 0.5)
    counts = sum(np.concatenate(sampler(labels, rng)).reshape(2, -1).sum(0) for _ in range(4000))
    np.testing.assert_allclose(counts / 4000, 0.5, atol=0.03)  # each label drawn half the time


def test_sampler_bad_input():
    s = BalancedPositiveNegativeSampler(256, 0.5)
    with pytest.raises(ValueError):
        s(np.zeros(4, np.float32), np.random.default_rng(0))
    with pytest.raises(TypeError):
        s(np.zeros(4, np.int64), 0)
    with pytest.raises(ValueError):
        BalancedPositiveNegativeSampler(256, 1.5)
