"""LevelMapper and MultiScaleRoIAlign: level assignment, RoI order, per-level backward."""

import numpy as np
import pytest

from tinymrcnn.gradcheck import numerical_gradient, relative_error
from tinymrcnn.model.poolers import LevelMapper, MultiScaleRoIAlign
from tinymrcnn.ops.roi_align import roi_align, roi_align_backward
from tinymrcnn.ops.roi_pool import roi_pool


def square(side, x=0.0, y=0.0):
    return [x, y, x + side, y + side]


def test_level_mapper_follows_the_fpn_formula():
    m = LevelMapper()
    boxes = np.array(
        [
            square(224),
            square(112),
            square(111.9),
            square(448),
            square(447.9),
            square(56),
            square(1000),
            square(10),
            [0, 0, 448, 112],
            [5, 5, 5, 5],
            [0, 0, np.nan, 3],
            [0, 0, -20, 30],
        ]
    )
    # 224 -> P4; half -> P3; just under half -> P2; double -> P5; clamped to [2, 5];
    # 448 x 112 has sqrt(area) 224 -> P4; zero, NaN or negative area -> P2
    np.testing.assert_array_equal(m(boxes), [4, 3, 2, 5, 4, 2, 5, 2, 4, 2, 2, 2])
    assert m(np.zeros((0, 4))).shape == (0,)
    # k0 and the canonical size are settings
    np.testing.assert_array_equal(LevelMapper(canonical_scale=112)(np.array([square(112)])), [4])
    np.testing.assert_array_equal(LevelMapper(canonical_level=3)(np.array([square(224)])), [3])
    # eps: sqrt(w h) / 224 a hair below a power of two still rounds up
    np.testing.assert_array_equal(m(np.array([square(112 * (1 - 1e-7))])), [3])
    np.testing.assert_array_equal(LevelMapper(eps=0.0)(np.array([square(112 * (1 - 1e-7))])), [2])


def pyramid(rng, n=2, c=3, image=256, dtype=np.float64):
    return [rng.standard_normal((n, c, image >> k, image >> k)).astype(dtype) for k in (2, 3, 4, 5)]


def mixed_rois(rng, n=2, k=20, image=256):
    sides = np.exp(rng.uniform(np.log(8), np.log(400), k))
    xy = rng.uniform(-10, image - 10, (k, 2))
    boxes = np.concatenate([xy, xy + sides[:, None] * rng.uniform(0.6, 1.4, (k, 2))], axis=1)
    return np.concatenate([rng.integers(0, n, (k, 1)), boxes], axis=1)


@pytest.mark.parametrize("op,mode", [("roi_align", "avg"), ("roi_align", "max"), ("roi_pool", "avg")])
def test_forward_pools_each_roi_from_its_level_in_roi_order(op, mode):
    rng = np.random.default_rng(0)
    feats = pyramid(rng)
    rois = mixed_rois(rng)
    pooler = MultiScaleRoIAlign(output_size=(4, 3), sampling_ratio=2, aligned=True, op=op, mode=mode)
    out = pooler(feats, rois)
    levels = pooler.map_levels(rois)
    assert set(levels) >= {2, 3, 4}, "the test should exercise several levels"
    assert out.shape == (len(rois), 3, 4, 3)
    for i, (roi, k) in enumerate(zip(rois, levels)):
        if op == "roi_pool":
            want = roi_pool(feats[k - 2], roi[None], (4, 3), 2.0**-k)
        else:
            want = roi_align(feats[k - 2], roi[None], (4, 3), 2.0**-k, 2, True, mode)
        np.testing.assert_allclose(out[i], want[0], rtol=1e-12)


@pytest.mark.parametrize("op,mode", [("roi_align", "avg"), ("roi_align", "max"), ("roi_pool", "avg")])
def test_backward_matches_finite_differences_on_every_level(op, mode):
    rng = np.random.default_rng(1)
    # distinct, well-separated values keep max and roi_pool away from ties
    feats = [rng.permutation(f.size).reshape(f.shape) * 0.1 for f in pyramid(rng, n=1, c=2, image=128)]
    rois = np.array([[0, 10, 12, 30, 28], [0, 5, 9, 80, 70], [0, 3, 3, 127, 120], [0, 40, 40, 52, 61]])
    pooler = MultiScaleRoIAlign(output_size=2, sampling_ratio=2, aligned=False, op=op, mode=mode)
    out = pooler(feats, rois)
    g = rng.standard_normal(out.shape)
    grads = pooler.backward(g)
    assert [d.shape for d in grads] == [f.shape for f in feats]
    levels = pooler.map_levels(rois)
    for lvl, (f, d) in enumerate(zip(feats, grads)):
        if lvl + 2 not in levels:
            assert not d.any()  # no RoI on this level: zeros
            continue

        def loss():
            y = pooler(feats, rois)
            pooler.clear_cache()
            return float(np.sum(y * g))

        num = numerical_gradient(loss, f, h=1e-3)  # piecewise linear: no truncation error
        assert relative_error(d, num) < 1e-7


def test_backward_equals_per_level_roi_align_backward():
    rng = np.random.default_rng(2)
    feats = pyramid(rng, dtype=np.float32)
    rois = mixed_rois(rng, k=40)
    pooler = MultiScaleRoIAlign(7, 2)
    out = pooler(feats, rois)
    dy = rng.standard_normal(out.shape).astype(np.float32)
    grads = pooler.backward(dy)
    levels = pooler.map_levels(rois)
    for k, (f, d) in enumerate(zip(feats, grads), start=2):
        sel = levels == k
        want = roi_align_backward(dy[sel], f, rois[sel], 7, 2.0**-k, 2)
        np.testing.assert_allclose(d, want, rtol=1e-6, atol=1e-6)
        assert d.dtype == np.float32


def test_prepared_features_and_zero_rois():
    rng = np.random.default_rng(3)
    feats = pyramid(rng, dtype=np.float32)
    rois = mixed_rois(rng).astype(np.float32)
    pooler = MultiScaleRoIAlign(7, 2)
    a = pooler(feats, rois)
    b = pooler(pooler.prepare(feats), rois)  # laid out once, shared by two poolers
    np.testing.assert_array_equal(a, b)
    ga, gb = pooler.backward(np.ones_like(b)), pooler.backward(np.ones_like(a))
    for x, y in zip(ga, gb):
        np.testing.assert_array_equal(x, y)
    empty = pooler(feats, np.zeros((0, 5), np.float32))
    assert empty.shape == (0, 3, 7, 7)
    assert all(not g.any() for g in pooler.backward(empty))


def test_eval_mode_keeps_no_cache_and_bad_input():
    rng = np.random.default_rng(4)
    feats = pyramid(rng)
    pooler = MultiScaleRoIAlign(7, 2).eval()
    pooler(feats, mixed_rois(rng))
    with pytest.raises(RuntimeError, match="eval mode"):
        pooler.backward(np.zeros((20, 3, 7, 7)))
    with pytest.raises(ValueError, match="4 feature maps"):
        pooler(feats[:3], mixed_rois(rng))
    with pytest.raises(ValueError, match="batch index"):
        pooler(feats, np.array([[2, 0, 0, 10, 10.0]]))
    with pytest.raises(ValueError, match="op must be"):
        MultiScaleRoIAlign(op="roi_warp")
