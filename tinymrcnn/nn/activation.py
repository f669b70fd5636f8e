"""Elementwise activations: ReLU and Sigmoid.

ReLU:     y = max(x, 0),          dx = dy * [x > 0]      (0 at x = 0, as torch)
Sigmoid:  y = 1 / (1 + e^-x),     dx = dy * y (1 - y)
"""

from __future__ import annotations

import numpy as np

from ..checks import check_float_array
from .module import Module


class ReLU(Module):
    """``y = max(x, 0)`` on an array of any shape.

    The cache is the boolean mask ``x > 0`` (one byte per element, a quarter
    of what keeping x in float32 would cost). NaN passes through as NaN, as in
    torch; the layers that mix values (norms, pooling, losses) reject it.
    (``np.maximum`` and a product with the boolean mask are used rather than
    ``np.where``, which was ~10x slower on float32 maps here.)
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_float_array(x, "ReLU input", finite=False)
        mask = x > 0
        self.save(mask)
        return np.maximum(x, x.dtype.type(0))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (mask,) = self.restore()
        return dy * mask  # the mask is cast to 0 / 1 in dy's dtype


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function: no overflow for large |x|."""
    # exp only of non-positive numbers: e = exp(-|x|) in (0, 1].
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


class Sigmoid(Module):
    """``y = 1 / (1 + exp(-x))``; the cache is y itself (dy/dx = y (1 - y))."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_float_array(x, "Sigmoid input", finite=False)
        y = sigmoid(x)
        self.save(y)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (y,) = self.restore()
        return dy * y * (1 - y)
