"""Linear (fully connected) layer and Flatten, as in the box head's TwoMLPHead.

    y = x W^T + b            x (N, in), W (out, in), b (out,)  ->  y (N, out)

Backward, with dy = dL/dy (N, out):

    dx = dy W                (N, in)
    dW = dy^T x              (out, in)
    db = sum_n dy[n]         (out,)

Leading dimensions other than the last are flattened into N, as torch does.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import check_float_array
from .module import Module, Parameter


class Linear(Module):
    """``y = x @ weight.T + bias``.

    Args:
        in_features, out_features: sizes of the last input and output axis.
        bias: add a learnable bias.
        rng: numpy Generator for the initial weights (default
            ``np.random.default_rng(0)``, so a model built twice is identical).

    Parameters (PyTorch names and shapes):
        weight (out_features, in_features), bias (out_features,), float32,
        both drawn from U(-1/sqrt(in), 1/sqrt(in)): PyTorch's default
        (kaiming_uniform with a = sqrt(5) gives exactly this bound).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng: np.random.Generator | None = None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got in={in_features}, out={out_features}")
        rng = np.random.default_rng(0) if rng is None else rng
        self.in_features, self.out_features = int(in_features), int(out_features)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32))
        self.bias = Parameter(rng.uniform(-bound, bound, out_features).astype(np.float32)) if bias else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., in) -> y (..., out)."""
        check_float_array(x, "Linear input")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expects input (..., {self.in_features}), got shape {x.shape}")
        w = self.weight.data.astype(x.dtype, copy=False)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        y = x2 @ w.T  # (N, out)
        if self.bias is not None:
            y += self.bias.data.astype(x.dtype, copy=False)
        self.save(x2, x.shape)
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy (..., out) -> dx (..., in); adds dW = dy^T x and db = sum(dy) to the grads."""
        x2, x_shape = self.restore()
        dy2 = dy.reshape(-1, self.out_features)  # (N, out)
        self.weight.accumulate(dy2.T @ x2)  # (out, in)
        if self.bias is not None:
            self.bias.accumulate(dy2.sum(axis=0))  # (out,)
        dx = dy2 @ self.weight.data.astype(dy2.dtype, copy=False)  # (N, in)
        return dx.reshape(x_shape)

    def __repr__(self) -> str:
        return f"Linear(in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None})"


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1*d2*...), e.g. RoI features (R, C, 7, 7) -> (R, C*49).

    Backward reshapes the gradient back; there is nothing to differentiate.
    """

    def __init__(self, start_dim: int = 1):
        super().__init__()
        self.start_dim = int(start_dim)

    def forward(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"Flatten input must be a numpy.ndarray, got {type(x).__name__}")
        if x.ndim < self.start_dim:
            raise ValueError(
                f"Flatten(start_dim={self.start_dim}) needs at least {self.start_dim} dimensions, got shape {x.shape}"
            )
        self.save(x.shape)
        return x.reshape(*x.shape[: self.start_dim], -1)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (shape,) = self.restore()
        return dy.reshape(shape)
