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
won (its ``argmax``); nothing else gets gradient. Derivation:
docs/derivations/roi_align.md.

``argmax`` is the flat index into the input, ``x.ravel()`` (so it names the
batch image and the channel too), or -1 for an empty bin; with it the
backward needs no RoIs: ``roi_pool_backward(dy, argmax, input_shape)``.
"""
from __future__ import annotations

import math

import numpy as np

from ..checks import check_float_array
from .roi_align import _check_args, _check_shape4, check_rois


def roi_pool(x, rois, output_size, spatial_scale=1.0):
    """Max-pool each RoI's quantised bins.

    Args:
        x: (N, C, H, W) float32/float64, finite.
        rois: (K, 5) [batch_index, x1, y1, x2, y2] in input pixels.
        output_size: int or (ph, pw).
        spatial_scale: map cells per input pixel.

    Returns:
        y: (K, C, ph, pw), x's dtype (0 for an empty bin).
        argmax: (K, C, ph, pw) int64, flat index into x (-1 for an empty bin).
    """
    from ..kernels.cpu.roi_pool import roi_pool_forward
    ph, pw = _check_args(output_size, 1, "avg", spatial_scale)
    check_float_array(x, "x", ndim=4)
    r = check_rois(rois, x.shape[0])
    return roi_pool_forward(np.ascontiguousarray(x), r, float(spatial_scale), ph, pw)


def _check_argmax(dy, argmax, shape):
    check_float_array(dy, "dy", ndim=4)
    if not isinstance(argmax, np.ndarray) or argmax.shape != dy.shape:
        raise ValueError(f"argmax must be an array of dy's shape {dy.shape}, got "
                         f"{getattr(argmax, 'shape', type(argmax).__name__)}")
    if not np.issubdtype(argmax.dtype, np.integer):
        raise ValueError(f"argmax must be an integer array, got {argmax.dtype}")
    N, C, H, W = shape
    if dy.shape[1] != C:
        raise ValueError(f"dy has {dy.shape[1]} channels, input_shape has {C}")
    a = argmax.astype(np.int64, copy=False)
    ok = a >= 0
    # each argmax must lie in its own channel's planes (that is what makes the backward race-free)
    chan = np.broadcast_to(np.arange(C)[None, :, None, None], a.shape)
    good = (a == -1) | (ok & (a < N * C * H * W) & ((a // max(H * W, 1)) % max(C, 1) == chan))
    if not good.all():
        raise ValueError("argmax holds indices that are not -1 or an element of the same channel "
                         f"of an input of shape {shape}: pass the argmax roi_pool returned")
    return np.ascontiguousarray(a)


def roi_pool_backward(dy, argmax, input_shape):
    """Gradient of :func:`roi_pool` with respect to x: dx[argmax] += dy.

    Args:
        dy: (K, C, ph, pw) gradient of the output.
        argmax: (K, C, ph, pw) int64 from :func:`roi_pool`.
        input_shape: (N, C, H, W).

    Returns:
        dx: (N, C, H, W), dy's dtype.
    """
    from ..kernels.cpu.roi_pool import roi_pool_backward as kernel
    shape = _check_shape4(input_shape)
    a = _check_argmax(dy, argmax, shape)
    return kernel(np.ascontiguousarray(dy), a, *shape)


# ----------------------------------------------------------------------------
# The readable reference (docs/semantics.md#roi-pooling, line by line)
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
    if not all(abs(c) < 2.0 ** 30 for c in v):               # NaN, inf, absurd: all bins empty
        return [[(0, 0, 0, 0)] * pw_ for _ in range(ph_)]
    start_w, start_h = _round(v[0]), _round(v[1])             # start = round(x1 * scale)
    roi_w = max(_round(v[2]) - start_w + 1, 1)                # roi = max(end - start + 1, 1)
    roi_h = max(_round(v[3]) - start_h + 1, 1)
    bin_h, bin_w = roi_h / ph_, roi_w / pw_                   # bin = roi / pooled (float)

    def clip(v, size):
        return min(max(v, 0), size)

    return [[(clip(math.floor(p * bin_h) + start_h, height), clip(math.ceil((p + 1) * bin_h) + start_h, height),
              clip(math.floor(q * bin_w) + start_w, width), clip(math.ceil((q + 1) * bin_w) + start_w, width))
             for q in range(pw_)] for p in range(ph_)]


def roi_pool_reference(x, rois, output_size, spatial_scale=1.0):
    """Readable RoI pooling: same signature and results as :func:`roi_pool`."""
    ph_, pw_ = _check_args(output_size, 1, "avg", spatial_scale)
    check_float_array(x, "x", ndim=4)
    r = check_rois(rois, x.shape[0])
    N, C, H, W = x.shape
    y = np.zeros((len(r), C, ph_, pw_), x.dtype)
    argmax = np.full((len(r), C, ph_, pw_), -1, np.int64)
    flat = np.arange(x.size).reshape(x.shape)                 # flat index of every element
    for k, roi in enumerate(r):
        b = int(roi[0])
        bins = roi_pool_cells(roi[1:], (ph_, pw_), spatial_scale, H, W)
        for ph in range(ph_):
            for pw in range(pw_):
                h0, h1, w0, w1 = bins[ph][pw]
                if h1 <= h0 or w1 <= w0:
                    continue                                  # empty bin: 0, argmax -1
                region = x[b, :, h0:h1, w0:w1].reshape(C, -1)  # (C, cells)
                win = region.argmax(axis=1)                   # first maximum
                y[k, :, ph, pw] = region[np.arange(C), win]
                argmax[k, :, ph, pw] = flat[b, :, h0:h1, w0:w1].reshape(C, -1)[np.arange(C), win]
    return y, argmax


def roi_pool_backward_reference(dy, argmax, input_shape):
    """Readable RoI pooling backward: same signature and result as :func:`roi_pool_backward`."""
    shape = _check_shape4(input_shape)
    a = _check_argmax(dy, argmax, shape)
    dx = np.zeros(int(np.prod(shape)), dy.dtype)
    hit = a >= 0
    np.add.at(dx, a[hit], dy[hit])                            # each output to its argmax
    return dx.reshape(shape)
