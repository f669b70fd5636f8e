"""Losses: values, float64 finite-difference gradients, edge cases, and (optionally) torch."""

import numpy as np
import pytest

from tinymrcnn.gradcheck import gradcheck
from tinymrcnn.losses import mask_loss, mask_loss_softmax, sigmoid_bce_with_logits, smooth_l1, softmax_cross_entropy

TOL = 1e-6


def rng(seed=0):
    return np.random.default_rng(seed)


def check_loss_grad(loss_fn, x, **kw):
    """Finite-difference check of d loss / d x for a (loss, grad) function.

    The step is 1e-4, not 1e-6: a mean over n elements has gradient entries
    ~|L| / n (and a softmax's off-target entries far smaller), where the
    rounding noise of the difference, ~1e-16 |L| / h, would reach 1e-5
    relative at h = 1e-6; the truncation error at h = 1e-4 is O(h^2) ~ 1e-8.
    """
    kw.setdefault("h", 1e-4)
    errs = gradcheck(lambda x: np.array(loss_fn(x)[0]), [x], lambda g: [g * loss_fn(x)[1]], max_checks=None, **kw)
    assert errs[0] <= TOL, errs


# ---------------------------------------------------------------------------
# Softmax cross-entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("N,K", [(6, 4), (1, 3), (9, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradient(N, K, reduction):
    z = rng(1).standard_normal((N, K)) * 2
    y = rng(2).integers(0, K, N)
    check_loss_grad(lambda z: softmax_cross_entropy(z, y, reduction=reduction), z)


def test_cross_entropy_value_weights_and_ignore():
    z = rng(3).standard_normal((5, 3))
    y = np.array([0, 2, -1, 1, 2])
    w = np.array([1.0, 2.0, 5.0, 0.5, 1.0])
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    keep = y >= 0
    nll = -logp[np.arange(5), np.where(keep, y, 0)]
    loss, g = softmax_cross_entropy(z, y)
    assert loss == pytest.approx(nll[keep].mean(), rel=1e-12)
    np.testing.assert_array_equal(g[2], 0.0)  # ignored row
    loss, g = softmax_cross_entropy(z, y, weights=w)
    assert loss == pytest.approx((w * nll)[keep].sum() / w[keep].sum(), rel=1e-12)
    loss, _ = softmax_cross_entropy(z, y, weights=w, reduction="sum")
    assert loss == pytest.approx((w * nll)[keep].sum(), rel=1e-12)
    check_loss_grad(lambda z: softmax_cross_entropy(z, y, weights=w), z)


def test_cross_entropy_is_stable_and_handles_empty():
    z = np.array([[1000.0, 0.0, -1000.0]])
    loss, g = softmax_cross_entropy(z, np.array([2]))
    assert loss == pytest.approx(2000.0) and np.isfinite(g).all()
    loss, g = softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, np.int64))
    assert loss == 0.0 and g.shape == (0, 3)
    loss, g = softmax_cross_entropy(np.ones((2, 3)), np.array([-1, -1]))
    assert loss == 0.0 and not g.any()
    z32 = rng().standard_normal((4, 3)).astype(np.float32)
    assert softmax_cross_entropy(z32, np.array([0, 1, 2, 0]))[1].dtype == np.float32


def test_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="0..2"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="integer"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="2 dimensions"):
        softmax_cross_entropy(np.zeros(3), np.array([0]))
    with pytest.raises(ValueError, match="non-finite"):
        softmax_cross_entropy(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="reduction"):
        softmax_cross_entropy(np.zeros((1, 2)), np.array([0]), reduction="none")


# ---------------------------------------------------------------------------
# Sigmoid BCE with logits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_gradient(shape, reduction):
    x = rng(4).standard_normal(shape) * 3
    t = rng(5).uniform(0, 1, shape)  # soft targets
    w = rng(6).uniform(0.1, 2, shape)
    check_loss_grad(lambda x: sigmoid_bce_with_logits(x, t, reduction=reduction), x)
    check_loss_grad(lambda x: sigmoid_bce_with_logits(x, t, weights=w, reduction=reduction), x)


def test_bce_values_and_stability():
    x = np.array([-2.0, 0.0, 3.0])
    t = np.array([0.0, 1.0, 0.25])
    s = 1 / (1 + np.exp(-x))
    ref = -(t * np.log(s) + (1 - t) * np.log(1 - s))
    loss, g = sigmoid_bce_with_logits(x, t, reduction="sum")
    assert loss == pytest.approx(ref.sum(), rel=1e-12)
    np.testing.assert_allclose(g, s - t, rtol=1e-12)
    loss, g = sigmoid_bce_with_logits(np.array([1000.0, -1000.0]), np.array([0.0, 1.0]), reduction="sum")
    assert loss == pytest.approx(2000.0) and np.isfinite(g).all()
    loss, g = sigmoid_bce_with_logits(np.array([1000.0, -1000.0]), np.array([1.0, 0.0]))
    assert loss == 0.0
    loss, g = sigmoid_bce_with_logits(np.zeros(0), np.zeros(0))
    assert loss == 0.0 and g.shape == (0,)


def test_bce_bad_input():
    with pytest.raises(ValueError, match="targets shape"):
        sigmoid_bce_with_logits(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        sigmoid_bce_with_logits(np.array([np.inf]), np.zeros(1))
    with pytest.raises(ValueError, match="weights must have shape"):
        sigmoid_bce_with_logits(np.zeros(3), np.zeros(3), weights=np.ones(2))


# ---------------------------------------------------------------------------
# Smooth L1
# ---------------------------------------------------------------------------


def away_from(values, points, margin=0.02):
    """Push every value at least ``margin`` away from each kink in ``points``."""
    v = values.copy()
    for p in points:
        close = np.abs(v - p) < margin
        v[close] = p + np.where(v[close] >= p, margin, -margin)
    return v


@pytest.mark.parametrize("beta", [1 / 9, 1.0, 0.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_smooth_l1_gradient(beta, reduction):
    target = rng(7).standard_normal((6, 4))
    d = away_from(rng(8).standard_normal((6, 4)) * beta * 3 + 0.01, [-beta, 0.0, beta])
    pred = target + d
    check_loss_grad(lambda p: smooth_l1(p, target, beta=beta, reduction=reduction), pred)


def test_smooth_l1_values_and_derivative_at_the_joins():
    beta = 0.5
    d = np.array([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0])
    loss, g = smooth_l1(d, np.zeros_like(d), beta=beta)
    l_ref = np.where(np.abs(d) < beta, 0.5 * d * d / beta, np.abs(d) - 0.5 * beta)
    assert loss == pytest.approx(l_ref.sum(), rel=1e-12)
    np.testing.assert_array_equal(g, [-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0])
    loss, g = smooth_l1(d, np.zeros_like(d), beta=0.0)  # L1, sign(0) = 0
    assert loss == pytest.approx(np.abs(d).sum())
    np.testing.assert_array_equal(g, np.sign(d))
    loss, g = smooth_l1(d, np.zeros_like(d), beta=0.0, reduction="mean")
    assert loss == pytest.approx(np.abs(d).mean())
    loss, g = smooth_l1(np.zeros((0, 4)), np.zeros((0, 4)), beta=1 / 9)
    assert loss == 0.0 and g.shape == (0, 4)


def test_smooth_l1_bad_input():
    with pytest.raises(ValueError, match="shape"):
        smooth_l1(np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="beta"):
        smooth_l1(np.zeros(2), np.zeros(2), beta=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        smooth_l1(np.array([np.nan]), np.zeros(1))


# ---------------------------------------------------------------------------
# Mask losses
# ---------------------------------------------------------------------------


def mask_case(R=3, K=4, M=5, seed=9):
    r = rng(seed)
    logits = r.standard_normal((R, K, M, M)) * 2
    labels = r.integers(1, K, R)
    targets = r.uniform(0, 1, (R, M, M))
    return logits, labels, targets


@pytest.mark.parametrize("R,K,M", [(3, 4, 5), (1, 2, 4), (4, 3, 6)])
def test_mask_loss_gradient_and_only_the_gt_channel(R, K, M):
    logits, labels, targets = mask_case(R, K, M)
    check_loss_grad(lambda z: mask_loss(z, labels, targets), logits)
    loss, g = mask_loss(logits, labels, targets)
    chosen = logits[np.arange(R), labels]
    ref, g_ref = sigmoid_bce_with_logits(chosen, targets)
    assert loss == pytest.approx(ref, rel=1e-12)
    off = np.ones((R, K), bool)
    off[np.arange(R), labels] = False
    assert not g[off].any()  # exactly zero elsewhere
    np.testing.assert_array_equal(g[np.arange(R), labels], g_ref)


def test_mask_losses_with_no_rois():
    for fn in (mask_loss, mask_loss_softmax):
        loss, g = fn(np.zeros((0, 3, 28, 28), np.float32), np.zeros(0, np.int64), np.zeros((0, 28, 28), np.float32))
        assert loss == 0.0 and g.shape == (0, 3, 28, 28) and g.dtype == np.float32


@pytest.mark.parametrize("R,K,M", [(3, 4, 5), (2, 2, 3)])
def test_mask_loss_softmax_gradient(R, K, M):
    logits, labels, targets = mask_case(R, K, M, seed=10)
    check_loss_grad(lambda z: mask_loss_softmax(z, labels, targets), logits)


def test_mask_loss_softmax_with_binary_targets_is_pixel_cross_entropy():
    R, K, M = 3, 4, 5
    logits, labels, targets = mask_case(R, K, M, seed=11)
    hard = (targets >= 0.5).astype(np.float64)
    loss, g = mask_loss_softmax(logits, labels, hard)
    pixel_labels = np.where(hard > 0, labels[:, None, None], 0)  # (R, M, M)
    flat = logits.transpose(0, 2, 3, 1).reshape(-1, K)  # pixels x classes
    ref, g_ref = softmax_cross_entropy(flat, pixel_labels.reshape(-1))
    assert loss == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(g, g_ref.reshape(R, M, M, K).transpose(0, 3, 1, 2), rtol=1e-12, atol=1e-15)


def test_mask_loss_bad_input():
    logits, labels, targets = mask_case()
    with pytest.raises(ValueError, match="channel indices"):
        mask_loss(logits, np.array([0, 1, 4]), targets)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_loss(logits, labels, targets + 1)
    with pytest.raises(ValueError, match="mask_targets must have shape"):
        mask_loss(logits, labels, targets[:, :4])
    with pytest.raises(ValueError, match="4 dimensions"):
        mask_loss(logits[0], labels, targets)
    bad = logits.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        mask_loss_softmax(bad, labels, targets)
    with pytest.raises(ValueError, match="background_channel"):
        mask_loss_softmax(logits, labels, targets, background_channel=7)


# ---------------------------------------------------------------------------
# Against PyTorch (optional)
# ---------------------------------------------------------------------------


def torch_loss_and_grad(torch, fn, x):
    xt = torch.tensor(x, requires_grad=True)
    loss = fn(xt)
    loss.backward()
    return float(loss.detach()), xt.grad.numpy()


@pytest.mark.torch
def test_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    z = rng(12).standard_normal((7, 5))
    y = np.array([0, 4, -1, 2, 2, -1, 1])
    cw = rng(13).uniform(0.5, 2, 5)
    for reduction in ("mean", "sum"):
        ref = torch_loss_and_grad(
            torch,
            lambda t: F.cross_entropy(
                t, torch.tensor(y), weight=torch.tensor(cw), ignore_index=-1, reduction=reduction
            ),
            z,
        )
        ours = softmax_cross_entropy(z, y, weights=cw[np.where(y >= 0, y, 0)], reduction=reduction)
        assert ours[0] == pytest.approx(ref[0], rel=1e-12)
        np.testing.assert_allclose(ours[1], ref[1], rtol=1e-10, atol=1e-15)


@pytest.mark.torch
def test_bce_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng(14).standard_normal((4, 6)) * 5
    t = rng(15).uniform(0, 1, (4, 6))
    w = rng(16).uniform(0, 2, (4, 6))
    for reduction in ("mean", "sum"):
        ref = torch_loss_and_grad(
            torch,
            lambda a: F.binary_cross_entropy_with_logits(
                a, torch.tensor(t), weight=torch.tensor(w), reduction=reduction
            ),
            x,
        )
        ours = sigmoid_bce_with_logits(x, t, weights=w, reduction=reduction)
        assert ours[0] == pytest.approx(ref[0], rel=1e-12)
        np.testing.assert_allclose(ours[1], ref[1], rtol=1e-10, atol=1e-15)


@pytest.mark.torch
@pytest.mark.parametrize("beta", [1 / 9, 1.0, 0.0])
def test_smooth_l1_matches_torch_including_kinks(beta):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    target = np.zeros(9)
    pred = np.array([-2.0, -beta, -0.05, 0.0, 0.05, beta, 2.0, 0.3, -0.7])
    for reduction in ("mean", "sum"):
        ref = torch_loss_and_grad(
            torch, lambda p: F.smooth_l1_loss(p, torch.tensor(target), beta=beta, reduction=reduction), pred
        )
        ours = smooth_l1(pred, target, beta=beta, reduction=reduction)
        assert ours[0] == pytest.approx(ref[0], rel=1e-12)
        np.testing.assert_allclose(ours[1], ref[1], rtol=1e-12, atol=1e-15)


@pytest.mark.torch
def test_mask_losses_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits, labels, targets = mask_case(R=4, K=3, M=6, seed=17)
    lt = torch.tensor(labels)
    # torchvision's maskrcnn_loss, given already-gathered targets
    ref = torch_loss_and_grad(
        torch,
        lambda z: F.binary_cross_entropy_with_logits(z[torch.arange(len(labels)), lt], torch.tensor(targets)),
        logits,
    )
    ours = mask_loss(logits, labels, targets)
    assert ours[0] == pytest.approx(ref[0], rel=1e-12)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-10, atol=1e-15)
    # softmax version: cross-entropy with per-pixel class probabilities
    q = np.zeros_like(logits)
    q[:, 0] = 1 - targets
    q[np.arange(4), labels] += targets
    ref = torch_loss_and_grad(torch, lambda z: F.cross_entropy(z, torch.tensor(q)), logits)
    ours = mask_loss_softmax(logits, labels, targets)
    assert ours[0] == pytest.approx(ref[0], rel=1e-12)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-10, atol=1e-15)
