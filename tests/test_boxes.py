"""Box arithmetic: IoU against the direct formula, the coder round trips, clip, remove-small."""

import math

import numpy as np
import pytest

from tinymrcnn.ops import BoxCoder, box_area, box_iou, clip_boxes_to_image, remove_small_boxes


def random_boxes(rng, n, dtype=np.float64, size=50.0, zero_area=0.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(0, size / 2, (n, 2))
    wh[rng.random(n) < zero_area, rng.integers(0, 2)] = 0.0
    return np.concatenate([xy, xy + wh], axis=1).astype(dtype)


def iou_direct(a, b):
    """IoU of two boxes, written out with Python floats."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_iou_equals_direct_formula(dtype):
    rng = np.random.default_rng(0)
    a = random_boxes(rng, 40, dtype, zero_area=0.2)
    b = np.concatenate([random_boxes(rng, 30, dtype, zero_area=0.2), a[:5]])  # some identical boxes
    iou = box_iou(a, b)
    assert iou.shape == (40, 35) and iou.dtype == dtype
    expected = np.array([[iou_direct(x, y) for y in b.astype(np.float64)] for x in a.astype(np.float64)])
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(iou, expected, rtol=tol, atol=tol)
    assert (iou[:5, 30:].diagonal()[(box_area(a[:5]) > 0)] == 1).all()
    assert ((iou >= 0) & (iou <= 1)).all()


def test_box_iou_hand_values_and_zero_area():
    a = np.array([[0, 0, 2, 2], [0, 0, 2, 1], [5, 5, 5, 5], [1, 1, 1, 3]], np.float64)
    b = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [5, 5, 5, 5]], np.float64)
    iou = box_iou(a, b)
    np.testing.assert_array_equal(iou[0], [1 / 7, 1 / 4, 0])
    np.testing.assert_array_equal(iou[1], [0, 1 / 2, 0])
    # zero-area boxes: IoU 0 with everything, even with themselves (torchvision would give NaN)
    np.testing.assert_array_equal(iou[2:], 0)
    assert box_iou(a[:0], b).shape == (0, 3) and box_iou(a, b[:0]).shape == (4, 0)


def test_box_area_and_clip():
    boxes = np.array([[-5, -5, 10, 20], [3, 4, 8, 6]], np.float32)
    np.testing.assert_array_equal(box_area(boxes), [375, 10])
    clipped = clip_boxes_to_image(boxes, (12, 9))  # (height, width)
    np.testing.assert_array_equal(clipped, [[0, 0, 9, 12], [3, 4, 8, 6]])
    assert clipped.dtype == np.float32
    # (N, 4k): every group of four is clipped the same way
    wide = np.concatenate([boxes, boxes + 100], axis=1)
    np.testing.assert_array_equal(
        clip_boxes_to_image(wide, (12, 9)), np.concatenate([clipped, [[9, 12, 9, 12]] * 2], axis=1)
    )


def test_remove_small_boxes_keeps_sides_equal_to_min_size():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0.999, 5], [0, 0, 5, 0.5], [2, 2, 3, 7], [0, 0, 0, 0]], np.float64)
    keep = remove_small_boxes(boxes, 1.0)
    np.testing.assert_array_equal(keep, [0, 3])
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(remove_small_boxes(boxes, 0.0), np.arange(5))


def test_encode_hand_values():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposal = np.array([[0, 0, 10, 20]], np.float64)  # centre (5, 10), size (10, 20)
    gt = np.array([[2, 4, 22, 24]], np.float64)  # centre (12, 14), size (20, 20)
    d = coder.encode(gt, proposal)
    np.testing.assert_allclose(d, [[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2), 5 * math.log(1)]], rtol=1e-15)
    np.testing.assert_allclose(coder.decode(d, proposal), gt, rtol=1e-14, atol=1e-13)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coder_round_trips(weights, dtype):
    rng = np.random.default_rng(1)
    coder = BoxCoder(weights)
    anchors = random_boxes(rng, 200, dtype) + np.array([0, 0, 1, 1], dtype)  # positive sizes
    gt = random_boxes(rng, 200, dtype) + np.array([0, 0, 1, 1], dtype)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    # decode(encode(g)) = g
    d = coder.encode(gt, anchors)
    assert d.shape == (200, 4) and d.dtype == dtype
    np.testing.assert_allclose(coder.decode(d, anchors), gt, rtol=tol, atol=tol * 50)
    # encode(decode(d)) = d while dw, dh stay below the clamp
    deltas = rng.normal(0, 1, (200, 4)).astype(dtype) * np.array(weights, dtype) * 0.5
    boxes = coder.decode(deltas, anchors)
    assert boxes.dtype == dtype
    np.testing.assert_allclose(coder.encode(boxes, anchors), deltas, rtol=tol * 10, atol=tol * 10)


def test_decode_clamps_dw_dh_and_handles_k_boxes_per_row():
    coder = BoxCoder()
    anchors = np.array([[0, 0, 16, 16], [10, 10, 20, 30]], np.float32)
    deltas = np.array([[0, 0, 10, 10], [0.5, -0.5, -1, 0.2]], np.float32)
    out = coder.decode(deltas, anchors)
    clip = math.log(1000 / 16)
    half = 0.5 * 16 * math.exp(clip)  # = 500: clamped at 1000 pixels
    np.testing.assert_allclose(out[0], [8 - half, 8 - half, 8 + half, 8 + half], rtol=1e-6)
    assert out.dtype == np.float32
    # (N, 4k): each group of four decodes as if alone
    wide = np.concatenate([deltas, deltas[::-1], np.zeros_like(deltas)], axis=1)
    out_k = coder.decode(wide, anchors)
    assert out_k.shape == (2, 12)
    np.testing.assert_array_equal(out_k[:, :4], out)
    np.testing.assert_array_equal(out_k[:, 4:8], coder.decode(deltas[::-1].copy(), anchors))
    np.testing.assert_array_equal(out_k[:, 8:], anchors)  # zero deltas give the anchors back


@pytest.mark.parametrize(
    "bad",
    [
        lambda: box_iou(np.array([[0, 0, np.nan, 1]]), np.zeros((1, 4))),
        lambda: box_iou(np.zeros((3, 5)), np.zeros((1, 4))),
        lambda: box_iou(np.zeros(4), np.zeros((1, 4))),
        lambda: box_iou(np.array([[5.0, 0, 1, 1]]), np.zeros((1, 4))),  # inverted
        lambda: box_iou(np.zeros((1, 4), np.int64), np.zeros((1, 4))),
        lambda: BoxCoder().encode(np.zeros((2, 4)) + [0, 0, 1, 1], np.zeros((3, 4)) + [0, 0, 1, 1]),
        lambda: BoxCoder().encode(np.array([[0.0, 0, 1, 1]]), np.array([[0.0, 0, 0, 1]])),  # zero width
        lambda: BoxCoder().decode(np.zeros((2, 5)), np.zeros((2, 4))),
        lambda: BoxCoder().decode(np.zeros((2, 4)), np.zeros((3, 4))),
        lambda: BoxCoder().decode(np.full((1, 4), np.inf), np.zeros((1, 4))),
        lambda: BoxCoder((1.0, 1.0, 0.0, 1.0)),
        lambda: clip_boxes_to_image(np.zeros((2, 3)), (5, 5)),
        lambda: clip_boxes_to_image(np.zeros((2, 4)), (5,)),
        lambda: remove_small_boxes(np.zeros((2, 4, 1)), 1.0),
    ],
)
def test_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.torch
def test_coder_and_iou_match_torchvision_formulas_in_torch():
    """torchvision is not installed here, so its code is repeated in torch (float32)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    a = random_boxes(rng, 64, np.float32) + np.float32([0, 0, 1, 1])
    b = random_boxes(rng, 64, np.float32) + np.float32([0, 0, 1, 1])
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)

    area1 = (ta[:, 2] - ta[:, 0]) * (ta[:, 3] - ta[:, 1])
    area2 = (tb[:, 2] - tb[:, 0]) * (tb[:, 3] - tb[:, 1])
    lt = torch.max(ta[:, None, :2], tb[:, :2])
    rb = torch.min(ta[:, None, 2:], tb[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    np.testing.assert_array_equal(box_iou(a, b), (inter / (area1[:, None] + area2 - inter)).numpy())

    wx, wy, ww, wh_ = 10.0, 10.0, 5.0, 5.0
    coder = BoxCoder((wx, wy, ww, wh_))
    # torchvision.models.detection._utils.encode_boxes(reference_boxes=tb, proposals=ta)
    ex_w, ex_h = ta[:, 2] - ta[:, 0], ta[:, 3] - ta[:, 1]
    ex_x, ex_y = ta[:, 0] + 0.5 * ex_w, ta[:, 1] + 0.5 * ex_h
    gt_w, gt_h = tb[:, 2] - tb[:, 0], tb[:, 3] - tb[:, 1]
    gt_x, gt_y = tb[:, 0] + 0.5 * gt_w, tb[:, 1] + 0.5 * gt_h
    t_enc = torch.stack(
        [
            wx * (gt_x - ex_x) / ex_w,
            wy * (gt_y - ex_y) / ex_h,
            ww * torch.log(gt_w / ex_w),
            wh_ * torch.log(gt_h / ex_h),
        ],
        dim=1,
    )
    np.testing.assert_allclose(coder.encode(b, a), t_enc.numpy(), rtol=1e-6, atol=1e-6)

    # BoxCoder.decode_single(rel_codes, boxes=ta), with two boxes per row and some huge dw
    codes = rng.normal(0, 3, (64, 8)).astype(np.float32)
    codes[::7, 2] = 60.0
    tc = torch.from_numpy(codes)
    ctr_x, ctr_y = ta[:, 0] + 0.5 * ex_w, ta[:, 1] + 0.5 * ex_h
    dx, dy = tc[:, 0::4] / wx, tc[:, 1::4] / wy
    dw = torch.clamp(tc[:, 2::4] / ww, max=math.log(1000.0 / 16))
    dh = torch.clamp(tc[:, 3::4] / wh_, max=math.log(1000.0 / 16))
    px, py = dx * ex_w[:, None] + ctr_x[:, None], dy * ex_h[:, None] + ctr_y[:, None]
    pw, ph = torch.exp(dw) * ex_w[:, None], torch.exp(dh) * ex_h[:, None]
    t_dec = torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], dim=2).flatten(1)
    np.testing.assert_allclose(coder.decode(codes, a), t_dec.numpy(), rtol=1e-6, atol=1e-4)
