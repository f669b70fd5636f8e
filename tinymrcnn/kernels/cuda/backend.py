"""The numba.cuda kernels behind ``tinymrcnn.ops``, with the CPU backend's functions.

Same functions, arguments and results as ``tinymrcnn/kernels/cpu/backend.py``
(NumPy in, NumPy out): each call copies its inputs to the GPU, runs the
kernels of ``conv.py`` / ``roi_align.py`` here, and copies the result back.
The convolution kernels compute in float32; RoIAlign in float32 or float64.
``tinymrcnn.kernels.set_device("cuda")`` makes the ops call these.
"""

from __future__ import annotations

import numpy as np

from . import conv as _conv
from . import roi_align as _roi
from .device import to_device, to_host


def _host(*arrays):
    return tuple(to_host(a) for a in arrays)


def conv2d(x, weight, bias, stride, padding, out_hw):
    return to_host(_conv.conv2d_forward_cuda(x, weight, bias, stride, padding))


def conv2d_backward(dy, x, weight, stride, padding, need_input_grad=True):
    dx, dw, db = _host(*_conv.conv2d_backward_cuda(dy, x, weight, stride, padding))
    return (dx if need_input_grad else None), dw, db


def conv_transpose2d(x, weight, bias, stride, padding, out_hw):
    return to_host(_conv.conv_transpose2d_forward_cuda(x, weight, bias, stride, padding))


def conv_transpose2d_backward(dy, x, weight, stride, padding):
    return _host(*_conv.conv_transpose2d_backward_cuda(dy, x, weight, stride, padding))


def roi_maps(features):
    """The maps on the GPU, (N, C, H, W) as the kernels read them: one copy per map, made once."""
    return [to_device(f) for f in features]


def roi_align_levels(maps, rois, levels, scales, output_size, sampling_ratio, aligned, use_max):
    """One launch per map that has RoIs; the results put back in RoI order on the host."""
    out = np.zeros((len(rois), maps[0].shape[1]) + tuple(output_size), dtype=np.dtype(maps[0].dtype))
    mode = "max" if use_max else "avg"
    for i, m in enumerate(maps):
        idx = np.flatnonzero(levels == i)
        if idx.size:
            out[idx] = to_host(
                _roi.roi_align_forward_cuda(m, rois[idx], output_size, scales[i], sampling_ratio, aligned, mode)
            )
    return out


def roi_align_levels_backward(dy, maps, rois, levels, scales, sampling_ratio, aligned, use_max):
    """Per-map gradients (atomic adds on the GPU), copied back; zeros for maps without RoIs."""
    mode = "max" if use_max else "avg"
    grads = []
    for i, m in enumerate(maps):
        idx = np.flatnonzero(levels == i)
        if idx.size == 0:
            grads.append(np.zeros(tuple(m.shape), dy.dtype))
            continue
        grads.append(
            to_host(
                _roi.roi_align_backward_cuda(
                    to_device(np.ascontiguousarray(dy[idx])),
                    rois[idx],
                    tuple(m.shape),
                    scales[i],
                    sampling_ratio,
                    aligned,
                    mode,
                    x_dev=m if use_max else None,
                )
            )
        )
    return grads
