"""The training losses, each returning ``(loss, grad)``.

Every function returns the scalar loss as a Python float and the gradient of
that scalar with respect to its first argument (the logits or the
predictions), an array of the same shape and dtype. A loss is the last node of
the graph, so its gradient is where every backward pass starts.

    softmax_cross_entropy    box head classifier (Fast R-CNN)
    sigmoid_bce_with_logits  RPN objectness
    smooth_l1                RPN and box head regression (beta = 1/9 in torchvision)
    rpn_loss                 the RPN's two losses, built from the two above
    fast_rcnn_loss           the box head's two losses (classification, box regression)
    mask_loss                Mask R-CNN's per-class mask loss (paper section 3)
    mask_loss_softmax        the coupled "multinomial" alternative of the paper's Table 2b

``rpn_loss`` and ``fast_rcnn_loss`` score two outputs at once and return
``((loss_a, loss_b), (grad_a, grad_b))``. The derivations are in
docs/derivations/losses.md. Internally the loss is
accumulated in float64, so the value does not depend on the input dtype more
than the inputs themselves do.
"""

from __future__ import annotations

import numpy as np

from .checks import check_float_array

_REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_int_array(a, name, shape):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")


def _check_weights(weights, shape, name="weights"):
    if weights is None:
        return None
    w = check_float_array(np.asarray(weights, dtype=np.float64), name)
    if w.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {w.shape}")
    if (w < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return w.astype(np.float64)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """``z - logsumexp(z)`` along ``axis``, shifted by the max so exp never overflows."""
    zmax = z.max(axis=axis, keepdims=True)
    return z - zmax - np.log(np.exp(z - zmax).sum(axis=axis, keepdims=True))


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, weights=None, ignore_index: int = -1, reduction: str = "mean"
):
    """Cross-entropy of softmax(logits) against integer labels.

    ``l_i = -log softmax(z_i)[y_i] = logsumexp(z_i) - z_{i, y_i}`` and
    ``dl_i/dz_i = softmax(z_i) - onehot(y_i)``.

    Args:
        logits: (N, K) float.
        labels: (N,) int in 0..K-1, or ``ignore_index`` for rows that take no
            part (no loss, zero gradient, not counted in the mean).
        weights: optional (N,) non-negative per-row weights w_i.
        reduction: "mean": ``sum_i w_i l_i / sum_i w_i`` over the kept rows
            (with w = 1: the mean over kept rows; with ``w = class_weight[labels]``
            this is torch's ``cross_entropy(weight=class_weight)``);
            "sum": ``sum_i w_i l_i``.

    Returns:
        (loss, dlogits (N, K)). No kept row (N = 0, all ignored, or zero total
        weight) gives loss 0 and a zero gradient (torch would return NaN).
    """
    _check_reduction(reduction)
    check_float_array(logits, "logits", ndim=2)
    N, K = logits.shape
    _check_int_array(labels, "labels", (N,))
    w = _check_weights(weights, (N,))
    keep = labels != ignore_index
    if ((labels[keep] < 0) | (labels[keep] >= K)).any():
        bad = labels[keep][(labels[keep] < 0) | (labels[keep] >= K)]
        raise ValueError(f"labels must be in 0..{K - 1} or ignore_index={ignore_index}, got {bad[:5].tolist()}")
    w = keep.astype(np.float64) if w is None else w * keep  # (N,), 0 on ignored rows
    total = w.sum() if reduction == "mean" else 1.0
    grad = np.zeros_like(logits)
    if N == 0 or total == 0:
        return 0.0, grad
    z = logits.astype(np.float64)
    logp = log_softmax(z, axis=1)  # (N, K)
    y = np.where(keep, labels, 0)
    nll = -logp[np.arange(N), y]  # (N,)
    loss = float((w * nll).sum() / total)
    g = np.exp(logp)  # softmax, (N, K)
    g[np.arange(N), y] -= 1.0
    grad[...] = g * (w / total)[:, None]
    return loss, grad


def sigmoid_bce_with_logits(logits: np.ndarray, targets: np.ndarray, weights=None, reduction: str = "mean"):
    """Binary cross-entropy of sigmoid(logits) against targets in [0, 1].

    ``l = -t log s(x) - (1 - t) log(1 - s(x))``, written in the stable form
    ``l = max(x, 0) - x t + log(1 + exp(-|x|))`` (no overflow, no log(0)), and
    ``dl/dx = s(x) - t``.

    Args:
        logits, targets: same shape, any rank; targets may be soft.
        weights: optional elementwise non-negative weights (broadcastable is
            not supported: give the full shape).
        reduction: "mean" divides ``sum(w l)`` by the number of elements (torch's
            convention for BCE weights), "sum" does not.

    Returns:
        (loss, dlogits). An empty input gives loss 0.
    """
    _check_reduction(reduction)
    check_float_array(logits, "logits")
    check_float_array(targets, "targets")
    if targets.shape != logits.shape:
        raise ValueError(f"targets shape {targets.shape} != logits shape {logits.shape}")
    w = _check_weights(weights, logits.shape)
    grad = np.zeros_like(logits)
    if logits.size == 0:
        return 0.0, grad
    x = logits.astype(np.float64)
    t = targets.astype(np.float64)
    e = np.exp(-np.abs(x))  # in (0, 1]
    l = np.maximum(x, 0) - x * t + np.log1p(e)
    s = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(x), stable
    g = s - t
    if w is not None:
        l, g = l * w, g * w
    norm = logits.size if reduction == "mean" else 1.0
    grad[...] = g / norm
    return float(l.sum() / norm), grad


def smooth_l1(pred: np.ndarray, target: np.ndarray, beta: float = 1.0, reduction: str = "sum"):
    """Smooth L1 (Huber / beta) loss of ``d = pred - target``, PyTorch's definition.

    ``l(d) = 0.5 d^2 / beta`` if ``|d| < beta`` else ``|d| - 0.5 beta``;
    ``beta = 0`` is plain L1, ``l = |d|``.

    Derivative (torch's choice at the joins): ``d / beta`` for ``|d| < beta``,
    else ``sign(d)`` with ``sign(0) = 0`` (so at beta = 0 the L1 kink gets 0).
    At ``|d| = beta > 0`` both pieces agree (``+-1``).

    Args:
        pred, target: same shape (e.g. (P, 4) box deltas).
        beta: >= 0.
        reduction: "sum" (the detection heads then divide by the number of
            sampled anchors / RoIs) or "mean" (divide by the element count).

    Returns:
        (loss, dpred).
    """
    _check_reduction(reduction)
    check_float_array(pred, "pred")
    check_float_array(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"target shape {target.shape} != pred shape {pred.shape}")
    beta = float(beta)
    if not beta >= 0:
        raise ValueError(f"smooth_l1 beta must be >= 0, got {beta}")
    grad = np.zeros_like(pred)
    if pred.size == 0:
        return 0.0, grad
    d = pred.astype(np.float64) - target.astype(np.float64)
    ad = np.abs(d)
    if beta == 0:
        l, g = ad, np.sign(d)
    else:
        quad = ad < beta
        l = np.where(quad, 0.5 * d * d / beta, ad - 0.5 * beta)
        g = np.where(quad, d / beta, np.sign(d))
    norm = pred.size if reduction == "mean" else 1.0
    grad[...] = g / norm
    return float(l.sum() / norm), grad


def rpn_loss(
    objectness: np.ndarray, deltas: np.ndarray, labels: np.ndarray, reg_targets: np.ndarray, beta: float = 1.0 / 9
):
    """The RPN's losses over a batch of images, all anchors of all levels at once.

    Objectness: BCE on the sampled anchors (label 1 or 0; -1 is not sampled);
    box regression: smooth L1 on the positives' deltas. Both are summed and
    divided by the number of sampled anchors in the batch (as torchvision).

    Args:
        objectness: (N, A) logits, A = all anchors of all levels.
        deltas: (N, A, 4) predicted box deltas.
        labels: (N, A) ints, 1 positive, 0 negative, -1 not sampled.
        reg_targets: (N, A, 4) encoded targets (read on positives only).
        beta: smooth L1's beta.

    Returns:
        ((loss_objectness, loss_rpn_box_reg), (d_objectness (N, A), d_deltas (N, A, 4))).
    """
    check_float_array(objectness, "objectness", ndim=2)
    check_float_array(deltas, "deltas", ndim=3)
    _check_int_array(labels, "labels", objectness.shape)
    sampled, positive = labels >= 0, labels == 1
    num_sampled = max(int(sampled.sum()), 1)
    obj, d_obj = sigmoid_bce_with_logits(objectness[sampled], labels[sampled].astype(objectness.dtype), reduction="sum")
    box, d_box = smooth_l1(deltas[positive], reg_targets[positive].astype(deltas.dtype), beta=beta, reduction="sum")
    d_objectness = np.zeros_like(objectness)
    d_objectness[sampled] = d_obj / num_sampled
    d_deltas = np.zeros_like(deltas)
    d_deltas[positive] = d_box / num_sampled
    return (obj / num_sampled, box / num_sampled), (d_objectness, d_deltas)


def fast_rcnn_loss(
    class_logits: np.ndarray,
    box_regression: np.ndarray,
    labels: np.ndarray,
    reg_targets: np.ndarray,
    beta: float = 1.0 / 9,
):
    """The box head's losses over the sampled RoIs of a batch.

    Classification: softmax cross-entropy, averaged over the R RoIs. Box
    regression: smooth L1 on the deltas of each positive RoI's own class
    (columns 4k..4k+3), summed and divided by R (not by the positives: as
    torchvision).

    Args:
        class_logits: (R, K); box_regression: (R, 4K).
        labels: (R,) ints in 0..K-1 (0 background).
        reg_targets: (R, 4) encoded targets (read on positives only).

    Returns:
        ((loss_classifier, loss_box_reg), (d_class_logits (R, K), d_box_regression (R, 4K))).
    """
    loss_cls, d_cls = softmax_cross_entropy(class_logits, labels, reduction="mean")
    check_float_array(box_regression, "box_regression", ndim=2)
    r = max(len(labels), 1)
    pos = np.flatnonzero(labels > 0)
    cols = 4 * labels[pos][:, None] + np.arange(4)  # (P, 4): the GT class's deltas
    box, g = smooth_l1(
        box_regression[pos[:, None], cols], reg_targets[pos].astype(box_regression.dtype), beta=beta, reduction="sum"
    )
    d_box = np.zeros_like(box_regression)
    d_box[pos[:, None], cols] = g / r
    return (loss_cls, box / r), (d_cls, d_box)


def _check_mask_args(mask_logits, labels, mask_targets):
    check_float_array(mask_logits, "mask_logits", ndim=4)
    R, K, M1, M2 = mask_logits.shape
    _check_int_array(labels, "labels", (R,))
    check_float_array(mask_targets, "mask_targets", ndim=3)
    if mask_targets.shape != (R, M1, M2):
        raise ValueError(
            f"mask_targets must have shape {(R, M1, M2)} to match mask_logits "
            f"{mask_logits.shape}, got {mask_targets.shape}"
        )
    if R and ((labels < 0) | (labels >= K)).any():
        raise ValueError(
            f"labels must be channel indices in 0..{K - 1}, got {labels[(labels < 0) | (labels >= K)][:5].tolist()}"
        )
    if R and ((mask_targets < 0) | (mask_targets > 1)).any():
        raise ValueError("mask_targets must lie in [0, 1]")
    return R, K, M1, M2


def mask_loss(mask_logits: np.ndarray, labels: np.ndarray, mask_targets: np.ndarray):
    """Mask R-CNN's mask loss: mean per-pixel BCE on the ground-truth class's channel.

    For RoI r with class k_r only channel k_r is scored (paper section 3: "L_mask
    is only defined on the k-th mask; other mask outputs do not contribute"):

        L = 1 / (R M M) * sum_{r, i, j} bce(z[r, k_r, i, j], t[r, i, j])

    so classes do not compete for a pixel. This equals torchvision's
    ``binary_cross_entropy_with_logits(mask_logits[arange(R), labels], targets)``.

    Args:
        mask_logits: (R, K, M, M) float, one channel per class (channel index
            = label, so with torchvision's layout channel 0 is background).
        labels: (R,) int in 0..K-1, the channel of each RoI's GT class.
        mask_targets: (R, M, M) floats in [0, 1] (soft targets allowed).

    Returns:
        (loss, dmask_logits (R, K, M, M)); the gradient is
        ``(sigmoid(z) - t) / (R M M)`` on channel k_r and exactly 0 on every
        other channel. R = 0 gives loss 0 and an empty gradient.
    """
    R, K, M1, M2 = _check_mask_args(mask_logits, labels, mask_targets)
    # --- exercise: mask_loss ---
    grad = np.zeros_like(mask_logits)
    if R == 0:
        return 0.0, grad
    rows = np.arange(R)
    chosen = mask_logits[rows, labels]  # (R, M, M)
    loss, g = sigmoid_bce_with_logits(chosen, mask_targets, reduction="mean")
    grad[rows, labels] = g
    return loss, grad
    # --- end exercise ---


def mask_loss_softmax(
    mask_logits: np.ndarray, labels: np.ndarray, mask_targets: np.ndarray, background_channel: int = 0
):
    """The coupled alternative: a per-pixel softmax over the K class channels.

    The Mask R-CNN paper (section 4.2, Table 2b, "multinomial vs. independent
    masks") compares its per-class sigmoid loss with a per-pixel softmax and a
    multinomial loss as in FCN semantic segmentation, where the classes
    compete at every pixel; that costs 5.5 mask AP. This is that baseline:
    at each pixel of RoI r, the K channels form one softmax p, and the pixel
    belongs to the RoI's class k_r with probability t (the mask target) and
    to the background channel otherwise:

        l[r, i, j] = -t log p[k_r] - (1 - t) log p[background_channel]
        L = 1 / (R M M) * sum_{r, i, j} l[r, i, j]

    With binary targets (detectron2 thresholds them at 0.5) this is exactly
    FCN's per-pixel cross-entropy with labels {k_r on the mask, background
    off it}; soft targets (torchvision's RoIAlign-ed masks) split the label.
    Gradient per pixel: ``p - q`` over all K channels, with q the target
    distribution (t on k_r, 1 - t on the background channel), divided by R M M.

    Args:
        mask_logits: (R, K, M, M).
        labels: (R,) int in 0..K-1 (positives, so normally not the background).
        mask_targets: (R, M, M) in [0, 1].
        background_channel: the channel that plays "not this object" (0 in
            torchvision's layout).

    Returns:
        (loss, dmask_logits (R, K, M, M)). R = 0 gives 0 and an empty gradient.
    """
    R, K, M1, M2 = _check_mask_args(mask_logits, labels, mask_targets)
    if not 0 <= background_channel < K:
        raise ValueError(f"background_channel must be in 0..{K - 1}, got {background_channel}")
    grad = np.zeros_like(mask_logits)
    if R == 0:
        return 0.0, grad
    z = mask_logits.astype(np.float64)
    logp = log_softmax(z, axis=1)  # (R, K, M, M)
    t = mask_targets.astype(np.float64)  # (R, M, M)
    q = np.zeros_like(z)  # target distribution
    rows = np.arange(R)
    q[:, background_channel] = 1.0 - t
    q[rows, labels] += t  # += : a label equal to the background gets t + (1 - t)
    n = R * M1 * M2
    loss = float(-(q * logp).sum() / n)
    grad[...] = (np.exp(logp) - q) / n
    return loss, grad
