"""RoI pooling (Fast R-CNN, Girshick 2015): the baseline RoIAlign replaced.

RoI pooling quantises twice (docs/semantics.md#roi-pooling;
docs/walkthrough.md#roi-pooling-versus-roialign-the-worked-example):

1. the RoI's corners are rounded to whole feature-map cells,
   start = round(x1 * scale), end = round(x2 * scale), size = end - start + 1;
2. that integer region is cut into ph x pw bins whose edges are rounded
   again, floor(p * bin) .. ceil((p + 1) * bin),

and each output is the max over its bin. Both roundings move the pooled
features away from where the RoI really is, by up to half a cell each: the
misalignment Mask R-CNN's masks suffer from (the paper's Table 2c).

Backward: the max routes each output's gradient to the one input element that
won (its argmax); nothing else gets gradient. Derivation:
docs/derivations/roi_align.md. As every functional op, the backward takes dy
and the forward's arguments, ``roi_pool_backward(dy, x, rois, output_size,
spatial_scale)``, and finds the winners again in x.

Read top to bottom: :func:`roi_pool_cells` (the quantised bins of one box),
:func:`roi_pool_reference` and :func:`roi_pool_backward_reference` (the
definition in readable NumPy), then :func:`roi_pool` and
:func:`roi_pool_backward`, the same on the Numba kernels of
``tinymrcnn/kernels/cpu/roi_pool.py``.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import check_float_array, check_roi_args, check_rois


# ----------------------------------------------------------------------------
# The definition, in readable NumPy (docs/semantics.md, "RoI pooling", line by line)
# ----------------------------------------------------------------------------
def _round(v):
    """C's round(): halves away from zero."""
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def roi_pool_cells(box, output_size, spatial_scale, height, width):
    """The cells each output bin of one box max-pools over.

    Returns:
        bins: ph x pw nested lists of (h0, h1, w0, w1), half-open, already
        clipped to the map (h1 <= h0 or w1 <= w0: an empty bin); [] entries
        for a box with a non-finite coordinate.
    """
    ph_, pw_ = (output_size, output_size) if np.isscalar(output_size) else output_size
    v = [float(c) * spatial_scale for c in box]
    if not all(abs(c) < 2.0**30 for c in v):  # NaN, inf, absurd: all bins empty
        return [[(0, 0, 0, 0)] * pw_ for _ in range(ph_)]
    start_w, start_h = _round(v[0]), _round(v[1])  # start = round(x1 * scale)
    roi_w = max(_round(v[2]) - start_w + 1, 1)  # roi = max(end - start + 1, 1)
    roi_h = max(_round(v[3]) - start_h + 1, 1)
    bin_h, bin_w = roi_h / ph_, roi_w / pw_  # bin = roi / pooled (float)

    def clip(v, size):
        return min(max(v, 0), size)

    return [
        [
            (
                clip(math.floor(p * bin_h) + start_h, height),
                clip(math.ceil((p + 1) * bin_h) + start_h, height),
                clip(math.floor(q * bin_w) + start_w, width),
                clip(math.ceil((q + 1) * bin_w) + start_w, width),
            )
            for q in range(pw_)
        ]
        for p in range(ph_)
    ]


def roi_pool_reference(x, rois, output_size, spatial_scale=1.0):
    """RoI pooling, readable: x (N, C, H, W), rois (K, 5) -> y (K, C, ph, pw); as :func:`roi_pool`."""
    return _pool_reference(x, rois, output_size, spatial_scale)[0]


def roi_pool_backward_reference(dy, x, rois, output_size, spatial_scale=1.0):
    """RoI pooling's gradient, readable: each output's dy goes to the element that won its bin."""
    _, winners = _pool_reference(x, rois, output_size, spatial_scale)
    _check_grad(dy, winners.shape)
    dx = np.zeros(x.size, dy.dtype)
    hit = winners >= 0
    np.add.at(dx, winners[hit], dy[hit])  # each output to its winner
    return dx.reshape(x.shape)


def _pool_reference(x, rois, output_size, spatial_scale):
    """-> (y, winners): the max of every bin and the flat index into x of the element
    that won it (first maximum; -1 for an empty bin)."""
    ph_, pw_ = check_roi_args(output_size, 1, "avg", spatial_scale)
    check_float_array(x, "x", ndim=4)
    r = check_rois(rois, x.shape[0])
    N, C, H, W = x.shape
    y = np.zeros((len(r), C, ph_, pw_), x.dtype)
    winners = np.full((len(r), C, ph_, pw_), -1, np.int64)
    flat = np.arange(x.size).reshape(x.shape)  # flat index of every element
    for k, roi in enumerate(r):
        b = int(roi[0])
        bins = roi_pool_cells(roi[1:], (ph_, pw_), spatial_scale, H, W)
        for ph in range(ph_):
            for pw in range(pw_):
                h0, h1, w0, w1 = bins[ph][pw]
                if h1 <= h0 or w1 <= w0:
                    continue  # empty bin: 0, no winner
                region = x[b, :, h0:h1, w0:w1].reshape(C, -1)  # (C, cells)
                win = region.argmax(axis=1)  # first maximum
                y[k, :, ph, pw] = region[np.arange(C), win]
                winners[k, :, ph, pw] = flat[b, :, h0:h1, w0:w1].reshape(C, -1)[np.arange(C), win]
    return y, winners


# ----------------------------------------------------------------------------
# The fast op: checks, then the Numba kernels (kernels/cpu/roi_pool.py)
# ----------------------------------------------------------------------------
def roi_pool(x, rois, output_size, spatial_scale=1.0):
    """Max-pool each RoI's quantised bins.

    Args:
        x: (N, C, H, W) float32/float64, finite.
        rois: (K, 5) [batch_index, x1, y1, x2, y2] in input pixels.
        output_size: int or (ph, pw).
        spatial_scale: map cells per input pixel.

    Returns:
        y: (K, C, ph, pw), x's dtype (0 for an empty bin).
    """
    return _pool(x, rois, output_size, spatial_scale)[0]


def roi_pool_backward(dy, x, rois, output_size, spatial_scale=1.0):
    """Gradient of :func:`roi_pool` with respect to x: each dy goes to its bin's winner.

    Args:
        dy: (K, C, ph, pw) gradient of the output.
        x, rois, output_size, spatial_scale: the forward's arguments.

    Returns:
        dx: (N, C, H, W), dy's dtype.
    """
    from ..kernels.cpu.roi_pool import roi_pool_backward as kernel

    _, winners = _pool(x, rois, output_size, spatial_scale)
    _check_grad(dy, winners.shape)
    if dy.dtype != x.dtype:
        raise ValueError(f"dtype mismatch (x: {x.dtype}, dy: {dy.dtype})")
    return kernel(np.ascontiguousarray(dy), winners, *x.shape)


def _pool(x, rois, output_size, spatial_scale):
    """-> (y, winners (K, C, ph, pw) int64: flat index into x, -1 for an empty bin)."""
    from ..kernels.cpu.roi_pool import roi_pool_forward

    ph, pw = check_roi_args(output_size, 1, "avg", spatial_scale)
    check_float_array(x, "x", ndim=4)
    r = check_rois(rois, x.shape[0])
    return roi_pool_forward(np.ascontiguousarray(x), r, float(spatial_scale), ph, pw)


def _check_grad(dy, shape):
    check_float_array(dy, "dy", ndim=4)
    if dy.shape != tuple(shape):
        raise ValueError(f"dy has shape {dy.shape}, expected the output's shape {tuple(shape)}")
