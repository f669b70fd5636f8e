"""2-D max pooling with argmax routing (the ResNet stem's 3x3/2 pool, FPN's P6).

Forward, for every plane (n, c) and output cell (i, j):

    y[i, j]      = max over the window W(i, j) of x
    argmax[i, j] = the flat index h * W + w of the first maximum in that window

The window of (i, j) covers rows ``i*s - p .. i*s - p + k - 1`` of the input
(likewise columns). Positions outside the input are padding and count as -inf,
so they never win; PyTorch asks ``p <= k / 2``, which keeps at least one real
element in every window.

Backward: each output gradient goes to the one input element that won,

    dx[n, c, argmax[i, j]] += dy[n, c, i, j]

(``+=`` because overlapping windows, stride < kernel, may share a winner).
Derivation and tie rule: docs/derivations/pooling.md.

Ties: the window is scanned row by row and an element replaces the current
maximum only if it is *strictly* greater, so the first maximum in scan order
wins and receives the whole gradient, exactly as PyTorch's CPU kernel does.

Two implementations with the same signatures, tested against each other:
``max_pool2d_reference`` / ``max_pool2d_backward_reference`` (NumPy, readable)
and ``max_pool2d`` / ``max_pool2d_backward`` (Numba, parallel over planes).
"""

from __future__ import annotations

import numba
import numpy as np

from ..checks import check_float_array, pair
from ..kernels import cpu as _cpu_kernels  # noqa: F401  (starts Numba's thread pool before any prange runs)
from .module import Module


def _pool_geometry(x_shape, kernel_size, stride, padding):
    """Validate pooling arguments; return (kh, kw), (sh, sw), (ph, pw), (OH, OW)."""
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(kernel_size if stride is None else stride, "stride")
    ph, pw = pair(padding, "padding")
    if kh < 1 or kw < 1:
        raise ValueError(f"max_pool2d kernel_size must be positive, got {(kh, kw)}")
    if sh < 1 or sw < 1:
        raise ValueError(f"max_pool2d stride must be positive, got {(sh, sw)}")
    if ph < 0 or pw < 0 or 2 * ph > kh or 2 * pw > kw:
        raise ValueError(
            f"max_pool2d padding must be between 0 and half the kernel size "
            f"(as PyTorch), got padding {(ph, pw)} for kernel {(kh, kw)}"
        )
    _, _, H, W = x_shape
    if kh > H + 2 * ph or kw > W + 2 * pw:
        raise ValueError(f"max_pool2d kernel {(kh, kw)} is larger than the padded input {(H + 2 * ph, W + 2 * pw)}")
    OH = (H + 2 * ph - kh) // sh + 1
    OW = (W + 2 * pw - kw) // sw + 1
    return (kh, kw), (sh, sw), (ph, pw), (OH, OW)


def _check_input(x):
    check_float_array(x, "max_pool2d input", ndim=4)


# ---------------------------------------------------------------------------
# Readable reference (NumPy)
# ---------------------------------------------------------------------------


def max_pool2d_reference(x: np.ndarray, kernel_size, stride=None, padding=0):
    """Max pooling in plain NumPy: one vectorised comparison per kernel offset.

    Args:
        x: (N, C, H, W) float32/float64, finite.
        kernel_size, stride (default = kernel_size), padding: int or (h, w).

    Returns:
        y (N, C, OH, OW) and argmax (N, C, OH, OW) int64, the flat index
        ``h * W + w`` of the winner inside its (H, W) input plane.
    """
    _check_input(x)
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = _pool_geometry(x.shape, kernel_size, stride, padding)
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    rows = np.arange(OH) * sh - ph  # top row of each window (unpadded coords)
    cols = np.arange(OW) * sw - pw
    y = np.full((N, C, OH, OW), -np.inf, dtype=x.dtype)
    argmax = np.zeros((N, C, OH, OW), dtype=np.int64)
    for di in range(kh):  # row-major scan of the window offsets
        for dj in range(kw):
            v = xp[:, :, di : di + sh * (OH - 1) + 1 : sh, dj : dj + sw * (OW - 1) + 1 : sw]
            better = v > y  # strictly greater: the first max wins
            y = np.where(better, v, y)
            flat = (rows[:, None] + di) * W + (cols[None, :] + dj)  # (OH, OW)
            argmax = np.where(better, flat, argmax)
    return y, argmax


def max_pool2d_backward_reference(dy: np.ndarray, argmax: np.ndarray, input_shape) -> np.ndarray:
    """dx (N, C, H, W): each dy[n, c, i, j] added to dx[n, c] at argmax[n, c, i, j]."""
    _check_backward_args(dy, argmax, input_shape)
    N, C, H, W = input_shape
    P = N * C
    dx = np.zeros((P, H * W), dtype=dy.dtype)
    plane = np.arange(P)[:, None]
    np.add.at(dx, (plane, argmax.reshape(P, -1)), dy.reshape(P, -1))
    return dx.reshape(N, C, H, W)


def _check_backward_args(dy, argmax, input_shape):
    check_float_array(dy, "max_pool2d grad_output", ndim=4, finite=False)
    if argmax.shape != dy.shape:
        raise ValueError(f"max_pool2d_backward: argmax shape {argmax.shape} != grad_output shape {dy.shape}")
    if len(input_shape) != 4 or tuple(input_shape[:2]) != dy.shape[:2]:
        raise ValueError(
            f"max_pool2d_backward: input_shape {tuple(input_shape)} does not match grad_output shape {dy.shape}"
        )


# ---------------------------------------------------------------------------
# Fast path (Numba): the same scan, one plane per parallel iteration
# ---------------------------------------------------------------------------


@numba.njit(cache=True, parallel=True)
def _max_pool2d_kernel(x, kh, kw, sh, sw, ph, pw, y, argmax):
    # x (P, H, W); y, argmax (P, OH, OW). Padding is never read: the window is
    # clipped to the input, which is the same as padding with -inf.
    P, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    for p in numba.prange(P):
        for i in range(OH):
            h0 = i * sh - ph
            h1 = min(h0 + kh, H)
            h0 = max(h0, 0)
            for j in range(OW):
                w0 = j * sw - pw
                w1 = min(w0 + kw, W)
                w0 = max(w0, 0)
                best = -np.inf
                best_idx = h0 * W + w0
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        v = x[p, h, w]
                        if v > best:  # strictly greater: first max wins
                            best = v
                            best_idx = h * W + w
                y[p, i, j] = best
                argmax[p, i, j] = best_idx


@numba.njit(cache=True, parallel=True)
def _max_pool2d_backward_kernel(dy, argmax, dx):
    # dy, argmax (P, OH*OW); dx (P, H*W), zero on entry. Planes are independent,
    # so the += inside one plane needs no atomics.
    P, L = dy.shape
    for p in numba.prange(P):
        for t in range(L):
            dx[p, argmax[p, t]] += dy[p, t]


def max_pool2d(x: np.ndarray, kernel_size, stride=None, padding=0):
    """Numba max pooling; same arguments and results as :func:`max_pool2d_reference`."""
    _check_input(x)
    (kh, kw), (sh, sw), (ph, pw), (OH, OW) = _pool_geometry(x.shape, kernel_size, stride, padding)
    N, C, H, W = x.shape
    y = np.empty((N * C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N * C, OH, OW), dtype=np.int64)
    _max_pool2d_kernel(np.ascontiguousarray(x).reshape(N * C, H, W), kh, kw, sh, sw, ph, pw, y, argmax)
    return y.reshape(N, C, OH, OW), argmax.reshape(N, C, OH, OW)


def max_pool2d_backward(dy: np.ndarray, argmax: np.ndarray, input_shape) -> np.ndarray:
    """Numba backward; same as :func:`max_pool2d_backward_reference`."""
    _check_backward_args(dy, argmax, input_shape)
    N, C, H, W = input_shape
    P = N * C
    dx = np.zeros((P, H * W), dtype=dy.dtype)
    _max_pool2d_backward_kernel(
        np.ascontiguousarray(dy).reshape(P, -1), np.ascontiguousarray(argmax).reshape(P, -1), dx
    )
    return dx.reshape(N, C, H, W)


class MaxPool2d(Module):
    """Max pooling layer (PyTorch ``nn.MaxPool2d`` with ceil_mode=False, dilation 1).

    Args:
        kernel_size: int or (kh, kw).
        stride: int or pair; default = kernel_size.
        padding: int or pair, at most half the kernel; padded cells never win.

    Shapes: x (N, C, H, W) -> y (N, C, OH, OW), OH = (H + 2p - k) // s + 1.
    The cache is the argmax (int64, output-sized) and the input shape.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, argmax = max_pool2d(x, self.kernel_size, self.stride, self.padding)
        self.save(argmax, x.shape)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        argmax, shape = self.restore()
        return max_pool2d_backward(dy, argmax, shape)

    def __repr__(self) -> str:
        return f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding})"
