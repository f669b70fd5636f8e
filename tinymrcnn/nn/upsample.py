"""Nearest-neighbour resize to an exact size (the FPN top-down path).

FPN adds ``F.interpolate(last, size=lateral.shape[-2:], mode="nearest")`` to
each lateral map (docs/semantics.md#backbone-and-fpn). Each output cell copies one input
cell; along each axis

    src(dst) = min(floor(dst * in / out), in - 1)

so the 2-D map is ``y[..., i, j] = x[..., src_h(i), src_w(j)]``.

Index rule, exactly as PyTorch's CPU kernel: ``out == in`` copies, ``out == 2 in``
uses ``dst // 2``, and otherwise the product ``dst * scale`` is formed in float32
with ``scale = float32(in) / float32(out)``; that rounding can move an index by
one where ``dst * in / out`` is a whole number, and torch's float32 path does
the same. (tinymrcnn uses this rule for every dtype; torch's float64 kernel
rounds differently in a few such cells.)

Backward: y copies x, so each input cell receives the sum of the gradients of
the output cells that copied it,

    dx[..., a, b] = sum over {i : src_h(i) = a} and {j : src_w(j) = b} of dy[..., i, j]

which is separable: sum along W into the source columns, then along H into the
source rows. src is non-decreasing, so each source's outputs are one run of
consecutive cells and ``np.add.reduceat`` sums them (a whole-number factor such
as the FPN's 2x is f strided slices). Derivation: docs/derivations/pooling.md,
"Nearest upsampling to an exact size".
"""

from __future__ import annotations

import numpy as np

from ..checks import check_float_array, pair
from .module import Module


def nearest_source_index(in_size: int, out_size: int) -> np.ndarray:
    """src (out_size,) int64: the input cell each output cell copies (torch's rule)."""
    dst = np.arange(out_size)
    if out_size == in_size:
        return dst
    if out_size == 2 * in_size:
        return dst // 2
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def _check(x, size):
    check_float_array(x, "upsample_nearest input", finite=False)
    if x.ndim < 3:
        raise ValueError(
            f"upsample_nearest expects (..., H, W) with a leading batch or channel axis, got shape {x.shape}"
        )
    oh, ow = pair(size, "size")
    if oh < 1 or ow < 1:
        raise ValueError(f"upsample_nearest size must be positive, got {(oh, ow)}")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"upsample_nearest input has an empty spatial axis: {x.shape}")
    return oh, ow


def upsample_nearest(x: np.ndarray, size) -> np.ndarray:
    """x (..., H, W) -> y (..., OH, OW), ``size = (OH, OW)`` (or an int for both)."""
    oh, ow = _check(x, size)
    rows = nearest_source_index(x.shape[-2], oh)  # (OH,)
    cols = nearest_source_index(x.shape[-1], ow)  # (OW,)
    # Two 1-D gathers (the rule is separable); 2-3x faster than x[..., rows[:, None], cols].
    return np.take(np.take(x, rows, axis=-2), cols, axis=-1)  # (..., OH, OW)


def _sum_into_sources(dy: np.ndarray, src: np.ndarray, in_size: int, axis: int) -> np.ndarray:
    """Sum dy along ``axis`` over the runs of equal ``src``; sources never copied get 0."""
    out_size = dy.shape[axis]
    f = out_size // in_size
    if f * in_size == out_size and np.array_equal(src, np.arange(out_size) // f):
        # Whole-number factor (the FPN's 2x): source a collects outputs a*f .. a*f + f - 1,
        # i.e. f strided slices; ~10x faster than reduceat.
        index = [slice(None)] * dy.ndim
        total = None
        for k in range(f):
            index[axis] = slice(k, None, f)
            part = dy[tuple(index)]
            total = part.copy() if total is None else total + part
        return total
    sources, starts = np.unique(src, return_index=True)  # src is sorted, so runs are contiguous
    summed = np.add.reduceat(dy, starts, axis=axis)
    if len(sources) == in_size:  # every source copied (upsampling)
        return summed
    shape = list(dy.shape)
    shape[axis] = in_size
    out = np.zeros(shape, dtype=dy.dtype)
    index = [slice(None)] * dy.ndim
    index[axis] = sources
    out[tuple(index)] = summed
    return out


def upsample_nearest_backward(dy: np.ndarray, input_shape) -> np.ndarray:
    """dy (..., OH, OW) -> dx of ``input_shape`` (..., H, W): gradients summed into sources."""
    check_float_array(dy, "upsample_nearest grad_output", finite=False)
    input_shape = tuple(input_shape)
    if dy.ndim != len(input_shape) or dy.shape[:-2] != input_shape[:-2]:
        raise ValueError(
            f"upsample_nearest_backward: grad_output shape {dy.shape} does not match input_shape {input_shape}"
        )
    H, W = input_shape[-2:]
    OH, OW = dy.shape[-2:]
    d = _sum_into_sources(dy, nearest_source_index(W, OW), W, axis=dy.ndim - 1)  # (..., OH, W)
    return _sum_into_sources(d, nearest_source_index(H, OH), H, axis=dy.ndim - 2)  # (..., H, W)


class UpsampleNearest(Module):
    """Nearest resize as a layer: ``forward(x, size)``, ``backward(dy) -> dx``.

    ``size`` is (OH, OW) or an int; it is an argument of forward, not of the
    layer, because the FPN resizes each level to the next lateral's shape.
    """

    def forward(self, x: np.ndarray, size) -> np.ndarray:
        y = upsample_nearest(x, size)
        self.save(x.shape)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (shape,) = self.restore()
        return upsample_nearest_backward(dy, shape)
