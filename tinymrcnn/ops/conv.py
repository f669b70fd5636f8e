"""2-D convolution and transposed convolution: forward and hand-written backward.

Definitions (as torch.nn.functional.conv2d / conv_transpose2d; no groups, no
dilation). With stride (sh, sw) and zero padding (ph, pw):

    conv2d:            y[n, o, oh, ow] = b[o] + sum_{c, i, j} w[o, c, i, j] * x[n, c, oh*sh + i - ph, ow*sw + j - pw]
    conv_transpose2d:  y[n, d, oh*sh + i - ph, ow*sw + j - pw] += x[n, c, oh, ow] * w[c, d, i, j]   (then + b[d])

conv_transpose2d is the adjoint of conv2d: its forward is conv2d's input
gradient, and its backward is conv2d's forward (for dx) and weight gradient
(for dw) with the roles of input and upstream gradient swapped. The
derivation of every backward is docs/derivations/conv.md.

Functions
---------
* ``*_reference`` (first below): the definitions above in slow, readable
  NumPy, one einsum per kernel tap. Read these to see what a convolution and
  its backward compute.
* :func:`conv2d`, :func:`conv2d_backward`, :func:`conv_transpose2d`,
  :func:`conv_transpose2d_backward`: the same signatures and results, fast.
  They check their arguments and call the active kernels
  (``tinymrcnn.kernels``): on the CPU ``tinymrcnn/kernels/cpu/conv.py``
  (shifted-window GEMMs in BLAS, data movement in Numba), on a GPU
  ``tinymrcnn/kernels/cuda/conv.py``. The tests hold them to the references.

The backward convention of every functional op in tinymrcnn: ``op_backward(dy,
*the forward's arguments*)`` returns the gradients of the forward's inputs
(a bias is left out of the arguments: no gradient depends on its value).

Shapes and dtypes
-----------------
x (N, C, H, W); conv2d weight (O, C, kh, kw), bias (O,), output
(N, O, Ho, Wo) with Ho = (H + 2 ph - kh) // sh + 1; conv_transpose2d weight
(C_in, C_out, kh, kw) as PyTorch, bias (C_out,), output (N, C_out, Hout, Wout)
with Hout = (H - 1) sh - 2 ph + kh. stride and padding are an int or a pair.
float32 or float64; every array of one call must share the dtype, and the
results have it. Bad arguments raise ValueError before any kernel runs.
"""

from __future__ import annotations

import numpy as np

from ..checks import check_float_array, check_same_dtype, pair
from ..kernels import active_backend

__all__ = [
    "conv2d",
    "conv2d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "conv2d_reference",
    "conv2d_backward_reference",
    "conv_transpose2d_reference",
    "conv_transpose2d_backward_reference",
]


# ---------------------------------------------------------------------------
# Readable references: one einsum per kernel tap, straight from the definitions
# ---------------------------------------------------------------------------
def _taps(kh, kw):
    return [(i, j) for i in range(kh) for j in range(kw)]


def _strided(a, i, j, n_h, n_w, sh, sw):
    """a[:, :, i + sh*k, j + sw*l] for k < n_h, l < n_w (a view)."""
    return a[:, :, i : i + sh * (n_h - 1) + 1 : sh, j : j + sw * (n_w - 1) + 1 : sw]


def conv2d_reference(x, weight, bias=None, stride=1, padding=0):
    """conv2d as a sum over kernel taps: y += w[:, :, i, j] . x_pad[..., i::sh, j::sw]."""
    (sh, sw), (ph, pw), (Ho, Wo) = _check_conv2d(x, weight, bias, stride, padding)
    O, C, kh, kw = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    y = np.zeros((x.shape[0], O, Ho, Wo), dtype=x.dtype)
    for i, j in _taps(kh, kw):
        patch = _strided(xp, i, j, Ho, Wo, sh, sw)  # (N, C, Ho, Wo)
        y += np.einsum("nchw,oc->nohw", patch, weight[:, :, i, j])
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def conv2d_backward_reference(dy, x, weight, stride=1, padding=0):
    """conv2d's gradients, tap by tap: each tap is a small dense layer between dy and a patch."""
    (sh, sw), (ph, pw), (Ho, Wo) = _check_conv2d(x, weight, None, stride, padding)
    _check_grad("conv2d_backward_reference", dy, (x.shape[0], weight.shape[0], Ho, Wo), x.dtype)
    # --- exercise: conv2d_backward ---
    O, C, kh, kw = weight.shape
    H, W = x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(weight)
    for i, j in _taps(kh, kw):
        patch = _strided(xp, i, j, Ho, Wo, sh, sw)  # (N, C, Ho, Wo)
        dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, patch)
        _strided(dxp, i, j, Ho, Wo, sh, sw)[...] += np.einsum("nohw,oc->nchw", dy, weight[:, :, i, j])
    dx = dxp[:, :, ph : ph + H, pw : pw + W]
    return np.ascontiguousarray(dx), dw, dy.sum(axis=(0, 2, 3))
    # --- end exercise ---


def conv_transpose2d_reference(x, weight, bias=None, stride=1, padding=0):
    """conv_transpose2d as a scatter: tap (i, j) of input pixel (h, w) lands on (h*sh + i, w*sw + j), then crop."""
    (sh, sw), (ph, pw), (Hout, Wout) = _check_conv_transpose2d(x, weight, bias, stride, padding)
    Cin, Cout, kh, kw = weight.shape
    N, _, H, W = x.shape
    full = np.zeros((N, Cout, (H - 1) * sh + kh, (W - 1) * sw + kw), dtype=x.dtype)
    for i, j in _taps(kh, kw):
        _strided(full, i, j, H, W, sh, sw)[...] += np.einsum("nchw,cd->ndhw", x, weight[:, :, i, j])
    y = full[:, :, ph : ph + Hout, pw : pw + Wout].copy()
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def conv_transpose2d_backward_reference(dy, x, weight, stride=1, padding=0):
    """conv_transpose2d's gradients: un-crop dy, then read it back at every tap's landing place."""
    (sh, sw), (ph, pw), (Hout, Wout) = _check_conv_transpose2d(x, weight, None, stride, padding)
    Cin, Cout, kh, kw = weight.shape
    N, _, H, W = x.shape
    _check_grad("conv_transpose2d_backward_reference", dy, (N, Cout, Hout, Wout), x.dtype)
    full = np.zeros((N, Cout, (H - 1) * sh + kh, (W - 1) * sw + kw), dtype=x.dtype)
    full[:, :, ph : ph + Hout, pw : pw + Wout] = dy
    dx = np.zeros_like(x)
    dw = np.zeros_like(weight)
    for i, j in _taps(kh, kw):
        landed = _strided(full, i, j, H, W, sh, sw)  # (N, C_out, H, W)
        dx += np.einsum("ndhw,cd->nchw", landed, weight[:, :, i, j])
        dw[:, :, i, j] = np.einsum("nchw,ndhw->cd", x, landed)
    return dx, dw, dy.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------
# The fast ops: checks, then the active kernels (tinymrcnn.kernels)
# ---------------------------------------------------------------------------
def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D convolution (cross-correlation, as PyTorch).

    Args:
        x: (N, C, H, W) input.
        weight: (O, C, kh, kw).
        bias: (O,) or None.
        stride, padding: int or (h, w) pair; zero padding.

    Returns:
        y (N, O, Ho, Wo), Ho = (H + 2 ph - kh) // sh + 1 (likewise Wo).
    """
    s, p, out_hw = _check_conv2d(x, weight, bias, stride, padding)
    return active_backend().conv2d(_c(x), _c(weight), _c(bias), s, p, out_hw)


def conv2d_backward(dy, x, weight, stride=1, padding=0, need_input_grad=True):
    """Gradients of conv2d (docs/derivations/conv.md, "conv2d backward").

        dx[n, c, h, w] = sum_{o, i, j: h = oh*sh + i - ph, w = ow*sw + j - pw} dy[n, o, oh, ow] w[o, c, i, j]
        dw[o, c, i, j] = sum_{n, oh, ow} dy[n, o, oh, ow] x[n, c, oh*sh + i - ph, ow*sw + j - pw]
        db[o]          = sum_{n, oh, ow} dy[n, o, oh, ow]

    Args:
        dy: (N, O, Ho, Wo), the gradient of the loss with respect to y.
        x, weight, stride, padding: as given to :func:`conv2d`.
        need_input_grad: False skips dx (returned as None), e.g. for the
            image below the stem convolution, which nothing learns from.

    Returns:
        (dx (N, C, H, W), dweight (O, C, kh, kw), dbias (O,)).
    """
    s, p, (Ho, Wo) = _check_conv2d(x, weight, None, stride, padding, op="conv2d_backward")
    _check_grad("conv2d_backward", dy, (x.shape[0], weight.shape[0], Ho, Wo), x.dtype)
    return active_backend().conv2d_backward(_c(dy), _c(x), _c(weight), s, p, need_input_grad)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0):
    """Transposed convolution ("deconvolution"), the adjoint of conv2d.

    Args:
        x: (N, C_in, H, W).
        weight: (C_in, C_out, kh, kw), PyTorch's layout.
        bias: (C_out,) or None.
        stride, padding: int or pair.

    Returns:
        y (N, C_out, Hout, Wout), Hout = (H - 1) sh - 2 ph + kh (likewise Wout).
    """
    s, p, out_hw = _check_conv_transpose2d(x, weight, bias, stride, padding)
    return active_backend().conv_transpose2d(_c(x), _c(weight), _c(bias), s, p, out_hw)


def conv_transpose2d_backward(dy, x, weight, stride=1, padding=0):
    """Gradients of conv_transpose2d (docs/derivations/conv.md, "transposed convolution").

    With conv2d's roles swapped (dy plays conv2d's input, x its upstream gradient):

        dx = conv2d(dy, weight)                  (N, C_in, H, W)
        dw = conv2d's weight gradient of (input dy, upstream x)   (C_in, C_out, kh, kw)
        db = dy summed over n, h, w              (C_out,)

    Args:
        dy: (N, C_out, Hout, Wout).
        x, weight, stride, padding: as given to :func:`conv_transpose2d`.

    Returns:
        (dx, dweight, dbias).
    """
    s, p, (Hout, Wout) = _check_conv_transpose2d(x, weight, None, stride, padding, op="conv_transpose2d_backward")
    y_shape = (x.shape[0], weight.shape[1], Hout, Wout)
    _check_grad("conv_transpose2d_backward", dy, y_shape, x.dtype)
    return active_backend().conv_transpose2d_backward(_c(dy), _c(x), _c(weight), s, p)


# ---------------------------------------------------------------------------
# Argument checks (shared by the fast ops and the references)
# ---------------------------------------------------------------------------
def _stride_padding(stride, padding) -> tuple[tuple[int, int], tuple[int, int]]:
    s, p = pair(stride, "stride"), pair(padding, "padding")
    if min(s) < 1:
        raise ValueError(f"stride must be positive, got {stride!r}")
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return s, p


def _check_conv(op, x, weight, bias, stride, padding, transposed):
    """Checks shared by conv2d and conv_transpose2d; returns ((sh, sw), (ph, pw), (kh, kw), (H, W)).

    The weight is (O, C, kh, kw) for conv2d and (C_in, C_out, kh, kw) for the
    transposed convolution: x's channels match its dimension 1 or 0, the bias its 0 or 1.
    """
    check_float_array(x, f"{op}: x", ndim=4)
    check_float_array(weight, f"{op}: weight", ndim=4)
    if bias is not None:
        check_float_array(bias, f"{op}: bias", ndim=1)
    check_same_dtype(("x", x), ("weight", weight), ("bias", bias))
    if min(weight.shape) < 1:
        raise ValueError(f"{op}: weight must have no empty dimension, got shape {weight.shape}")
    s, p = _stride_padding(stride, padding)
    c_in, c_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    layout = "(C_in, C_out, kh, kw)" if transposed else "(O, C, kh, kw)"
    if x.shape[1] != c_in:
        raise ValueError(
            f"{op}: channel mismatch: x has {x.shape[1]} channels (shape {x.shape}), "
            f"weight expects {c_in} (weight shape {layout} = {weight.shape})"
        )
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"{op}: bias must have shape ({c_out},), got {bias.shape}")
    if min(x.shape[2:]) < 1:
        raise ValueError(f"{op}: x has an empty spatial dimension, shape {x.shape}")
    return s, p, weight.shape[2:], x.shape[2:]


def _check_conv2d(x, weight, bias, stride, padding, op="conv2d"):
    """Validate conv2d arguments; returns ((sh, sw), (ph, pw), (Ho, Wo))."""
    (sh, sw), (ph, pw), (kh, kw), (H, W) = _check_conv(op, x, weight, bias, stride, padding, False)
    if kh > H + 2 * ph or kw > W + 2 * pw:
        raise ValueError(
            f"{op}: kernel larger than padded input: kernel {kh}x{kw}, input {H}x{W} "
            f"with padding ({ph}, {pw}) is {H + 2 * ph}x{W + 2 * pw}"
        )
    return (sh, sw), (ph, pw), ((H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)


def _check_conv_transpose2d(x, weight, bias, stride, padding, op="conv_transpose2d"):
    """Validate conv_transpose2d arguments; returns ((sh, sw), (ph, pw), (Hout, Wout))."""
    (sh, sw), (ph, pw), (kh, kw), (H, W) = _check_conv(op, x, weight, bias, stride, padding, True)
    Hout, Wout = (H - 1) * sh - 2 * ph + kh, (W - 1) * sw - 2 * pw + kw
    if Hout < 1 or Wout < 1:
        raise ValueError(
            f"{op}: padding ({ph}, {pw}) too large: the output would be {Hout}x{Wout} "
            f"for input {H}x{W}, kernel {kh}x{kw}, stride ({sh}, {sw})"
        )
    return (sh, sw), (ph, pw), (Hout, Wout)


def _check_grad(op, dy, expected_shape, dtype):
    check_float_array(dy, f"{op}: dy", ndim=4)
    if dy.shape != tuple(expected_shape):
        raise ValueError(f"{op}: dy must have the output's shape {tuple(expected_shape)}, got {dy.shape}")
    if dy.dtype != dtype:
        raise ValueError(f"{op}: dtype mismatch (dy: {dy.dtype}, x: {dtype}); cast all inputs to one dtype")


def _c(a):
    return None if a is None else np.ascontiguousarray(a)
