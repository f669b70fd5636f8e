"""The CPU kernels behind ``tinymrcnn.ops``: Numba loops and BLAS products.

Every function here takes arguments that ``tinymrcnn.ops`` has already
checked (shapes, dtypes, finite values, batch indices) and NumPy arrays in
(N, C, H, W), and returns NumPy arrays. ``tinymrcnn/kernels/cuda/backend.py``
has the same functions for an NVIDIA GPU; ``tinymrcnn.kernels.active_backend()``
picks one of the two.
"""

from __future__ import annotations

import numpy as np

from . import conv as _conv
from . import roi_align as _roi


# -- convolution (kernels/cpu/conv.py explains the layout) ----------------------------
def conv2d(x, weight, bias, stride, padding, out_hw):
    """x (N, C, H, W), weight (O, C, kh, kw), bias (O,) or None -> y (N, O, Ho, Wo)."""
    if x.shape[0] == 0:
        return np.zeros((0, weight.shape[0]) + tuple(out_hw), dtype=x.dtype)
    return _conv.conv_output(x, weight, bias, _conv.geometry(x.shape, weight.shape, stride, padding))


def conv2d_backward(dy, x, weight, stride, padding, need_input_grad=True):
    """-> (dx or None, dweight, dbias)."""
    if x.shape[0] == 0:
        dx = np.zeros_like(x) if need_input_grad else None
        return dx, np.zeros_like(weight), np.zeros(weight.shape[0], dtype=x.dtype)
    g = _conv.geometry(x.shape, weight.shape, stride, padding)
    dx, dw = _conv.conv_gradients(dy, x, weight, g, need_input_grad)
    return dx, dw, dy.sum(axis=(0, 2, 3))


def _transposed_geometry(y_shape, weight, stride, padding):
    """conv_transpose2d(x, w) is the input gradient of conv2d over an input shaped like its output."""
    return _conv.geometry(y_shape, weight.shape, stride, padding)  # (C_in, C_out, ...) read as (O, C, ...)


def conv_transpose2d(x, weight, bias, stride, padding, out_hw):
    """x (N, C_in, H, W), weight (C_in, C_out, kh, kw) -> y (N, C_out, Hout, Wout)."""
    y_shape = (x.shape[0], weight.shape[1]) + tuple(out_hw)
    if x.shape[0] == 0:
        return np.zeros(y_shape, dtype=x.dtype)
    return _conv.conv_input_grad(x, weight, _transposed_geometry(y_shape, weight, stride, padding), bias)


def conv_transpose2d_backward(dy, x, weight, stride, padding):
    """-> (dx, dweight, dbias); conv2d's passes with the roles of x and dy swapped."""
    if x.shape[0] == 0:
        return np.zeros_like(x), np.zeros_like(weight), np.zeros(weight.shape[1], dtype=x.dtype)
    g = _transposed_geometry(dy.shape, weight, stride, padding)
    return _conv.conv_output(dy, weight, None, g), _conv.conv_weight_grad(x, dy, g), dy.sum(axis=(0, 2, 3))


# -- RoIAlign (kernels/cpu/roi_align.py) -------------------------------------------
def roi_maps(features):
    """The maps as the RoIAlign kernels read them: channels last (a copy per map, made once)."""
    return [_roi.channels_last(f) for f in features]


def roi_align_levels(maps, rois, levels, scales, output_size, sampling_ratio, aligned, use_max):
    """-> (K, C, ph, pw): RoI k pooled from maps[levels[k]]; maps from :func:`roi_maps`."""
    ph, pw = output_size
    return _roi.roi_align_forward_nhwc(
        tuple(m.data for m in maps),
        levels,
        np.asarray(scales, np.float64),
        rois,
        ph,
        pw,
        sampling_ratio,
        aligned,
        use_max,
    )


def roi_align_levels_backward(dy, maps, rois, levels, scales, sampling_ratio, aligned, use_max):
    """-> one (N, C, H_l, W_l) gradient per map (zeros where no RoI pooled)."""
    grads = []
    dy = np.ascontiguousarray(dy)
    for i, m in enumerate(maps):
        n, c, h, w = m.shape
        index = np.flatnonzero(levels == i)
        if len(index) == 0:
            grads.append(np.zeros((n, c, h, w), dy.dtype))
            continue
        # 8-row stripes: one task's (8, W, C) accumulator stays in cache (1.6 MB for W=200, C=256)
        grads.append(
            _roi.roi_align_backward_stripes(
                dy, rois, index, m.data, n, h, w, float(scales[i]), sampling_ratio, aligned, use_max, 8
            )
        )
    return grads
