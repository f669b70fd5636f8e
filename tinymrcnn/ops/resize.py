"""Resizing images and masks (no gradient: it happens before the network).

Shared by the model's input transform (``tinymrcnn/model/transform.py``)
and the dataset transforms (``tinymrcnn/data/transforms.py``), so both
resize exactly alike.
"""

from __future__ import annotations

import math

import numpy as np


def interpolate_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (..., H, W) to (..., h, w) with half-pixel centres.

    PyTorch's ``align_corners=False``: output pixel i samples the input at
    ``(i + 0.5) * H / h - 0.5``, clamped below at 0; the neighbours are
    ``floor`` and ``floor + 1`` (clamped at H - 1).
    """
    h_in, w_in = x.shape[-2:]
    h, w = int(size[0]), int(size[1])

    def axis(n_out, n_in):
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).astype(x.dtype)
        return lo, hi, frac

    y0, y1, fy = axis(h, h_in)
    x0, x1, fx = axis(w, w_in)
    top = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]  # (..., h, W)
    out = top[..., x0] * (1 - fx) + top[..., x1] * fx  # (..., h, w)
    return np.ascontiguousarray(out.astype(x.dtype, copy=False))


def resize_nearest(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of (..., H, W) (PyTorch 'nearest': src = floor(dst * H / h)), for masks."""
    h_in, w_in = x.shape[-2:]
    ys = np.minimum(np.floor(np.arange(size[0]) * (h_in / size[0])).astype(np.int64), h_in - 1)
    xs = np.minimum(np.floor(np.arange(size[1]) * (w_in / size[1])).astype(np.int64), w_in - 1)
    return np.ascontiguousarray(x[..., ys[:, None], xs[None, :]])


def resized_shape(h: int, w: int, min_size: int | None, max_size: int | None) -> tuple[tuple[int, int], float]:
    """(new_h, new_w), scale = min(min_size / short, max_size / long); floor(side * scale)."""
    if min_size is None:
        return (h, w), 1.0
    scale = min_size / min(h, w)
    if max_size is not None:
        scale = min(scale, max_size / max(h, w))
    return (int(math.floor(h * scale)), int(math.floor(w * scale))), scale
