"""Numba CPU kernels for RoI pooling (Fast R-CNN; docs/semantics.md#roi-pooling).

The readable reference is in ``tinymrcnn/ops/roi_pool.py``; tests hold these
kernels to it. RoI pooling is the baseline RoIAlign replaced (the paper's
Table 2c), so these kernels aim at clarity more than speed: they read the
(N, C, H, W) map directly, one channel plane at a time.

``argmax`` convention: the flat index into the whole input, ``x.ravel()``
(``((b * C + c) * H + h) * W + w``), or -1 for an empty bin. It names the
batch image and channel too, so the backward needs no RoIs.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True)
def round_half_away(v):
    """C's round(): halves go away from zero (Python's round() goes to even)."""
    if v >= 0.0:
        return math.floor(v + 0.5)
    return -math.floor(-v + 0.5)


@njit(cache=True)
def roi_pool_extent(x1, y1, x2, y2, spatial_scale):
    """The RoI quantised to whole cells (the *first* quantisation).

    Returns:
        (valid, start_h, start_w, roi_h, roi_w): start = round(x1 * scale),
        roi = max(round(x2 * scale) - start + 1, 1). ``valid`` is False for a
        box with a NaN or infinite coordinate, or one beyond +-2^30 cells
        (which no integer arithmetic should see): every bin is then empty.
    """
    v1 = x1 * spatial_scale
    v2 = y1 * spatial_scale
    v3 = x2 * spatial_scale
    v4 = y2 * spatial_scale
    lim = 2.0**30
    if not (abs(v1) < lim and abs(v2) < lim and abs(v3) < lim and abs(v4) < lim):  # NaN too
        return False, 0, 0, 1, 1
    start_w = int(round_half_away(v1))
    start_h = int(round_half_away(v2))
    roi_w = max(int(round_half_away(v3)) - start_w + 1, 1)
    roi_h = max(int(round_half_away(v4)) - start_h + 1, 1)
    return True, start_h, start_w, roi_h, roi_w


@njit(cache=True)
def roi_pool_bin(p, start, roi_size, pooled, size):
    """Bounds [lo, hi) of bin ``p`` along one axis (the *second* quantisation).

    bin = roi_size / pooled (a float); lo = floor(p * bin) + start,
    hi = ceil((p + 1) * bin) + start, both clipped to [0, size].
    """
    bin_size = roi_size / pooled
    lo = int(math.floor(p * bin_size)) + start
    hi = int(math.ceil((p + 1) * bin_size)) + start
    return min(max(lo, 0), size), min(max(hi, 0), size)


@njit(parallel=True, cache=True)
def roi_pool_forward(x, rois, spatial_scale, pooled_h, pooled_w):
    """Max over each quantised bin.

    Args:
        x: (N, C, H, W) float32/float64.
        rois: (K, 5) float64, batch indices validated.

    Returns:
        y: (K, C, pooled_h, pooled_w), x's dtype; 0 for an empty bin.
        argmax: (K, C, pooled_h, pooled_w) int64, flat index into x, -1 if empty.
    """
    N, C, H, W = x.shape
    K = rois.shape[0]
    y = np.zeros((K, C, pooled_h, pooled_w), dtype=x.dtype)
    argmax = np.full((K, C, pooled_h, pooled_w), -1, dtype=np.int64)
    for k in prange(K):
        b = int(rois[k, 0])
        valid, start_h, start_w, roi_h, roi_w = roi_pool_extent(
            rois[k, 1], rois[k, 2], rois[k, 3], rois[k, 4], spatial_scale
        )
        if not valid:
            continue
        for ph in range(pooled_h):
            h0, h1 = roi_pool_bin(ph, start_h, roi_h, pooled_h, H)
            for pw in range(pooled_w):
                w0, w1 = roi_pool_bin(pw, start_w, roi_w, pooled_w, W)
                if h1 <= h0 or w1 <= w0:
                    continue  # empty bin: 0, argmax -1
                for c in range(C):
                    best = -np.inf
                    best_i = -1
                    plane = (b * C + c) * H
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            v = x[b, c, h, w]
                            if v > best:  # first maximum wins ties
                                best = v
                                best_i = (plane + h) * W + w
                    y[k, c, ph, pw] = best
                    argmax[k, c, ph, pw] = best_i
    return y, argmax


@njit(parallel=True, cache=True)
def roi_pool_backward(dy, argmax, batch, channels, height, width):
    """dx[argmax] += dy for every non-empty bin.

    Race-free: ``prange`` over channels; channel c's argmaxes all lie in
    channel c's planes, so no two threads add into the same element.

    Returns:
        dx: (N, C, H, W), dy's dtype.
    """
    K, C, PH, PW = dy.shape
    dx = np.zeros(batch * channels * height * width, dtype=dy.dtype)
    for c in prange(C):
        for k in range(K):
            for ph in range(PH):
                for pw in range(PW):
                    i = argmax[k, c, ph, pw]
                    if i >= 0:
                        dx[i] += dy[k, c, ph, pw]
    return dx.reshape(batch, channels, height, width)
