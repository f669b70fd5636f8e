"""Conv2d and ConvTranspose2d layers over the functional ops in tinymrcnn.ops.conv.

    Conv2d:           y = conv2d(x, W, b)             W (O, C, kh, kw),     b (O,)
    ConvTranspose2d:  y = conv_transpose2d(x, W, b)   W (C_in, C_out, kh, kw), b (C_out,)

The forward caches (x, W); the backward calls the matching ``*_backward`` op,
adds dW and db into the parameters' ``.grad`` and returns dx. The math of both
backward passes is docs/derivations/conv.md. Where the ops compute (CPU or
GPU kernels) is chosen by ``tinymrcnn.kernels``, not here.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import pair
from ..ops.conv import conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward
from .module import Module, Parameter


def _torch_default_init(rng, weight_shape, fan_in, bias_size):
    """PyTorch's default: kaiming_uniform(a=sqrt(5)) for W, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    and the same bound for b (None when bias_size is None)."""
    bound = 1.0 / math.sqrt(fan_in)
    w = rng.uniform(-bound, bound, weight_shape).astype(np.float32)
    b = None if bias_size is None else rng.uniform(-bound, bound, bias_size).astype(np.float32)
    return w, b


class _ConvBase(Module):
    """What Conv2d and ConvTranspose2d share: arguments, PyTorch's default init, the gradients' sink."""

    transposed = False  # weight (C_in, C_out, kh, kw) instead of (O, C, kh, kw)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        rng: np.random.Generator | None = None,
    ):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"{type(self).__name__} needs positive channel counts, got in={in_channels}, out={out_channels}"
            )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"{type(self).__name__}: kernel_size and stride must be positive and "
                f"padding non-negative, got {self.kernel_size}, {self.stride}, {self.padding}"
            )
        rng = np.random.default_rng(0) if rng is None else rng
        kh, kw = self.kernel_size
        if self.transposed:  # PyTorch's fan_in reads dimension 1 of the weight: C_out * kh * kw
            shape, fan_in = (in_channels, out_channels, kh, kw), out_channels * kh * kw
        else:
            shape, fan_in = (out_channels, in_channels, kh, kw), in_channels * kh * kw
        w, b = _torch_default_init(rng, shape, fan_in, out_channels if bias else None)
        self.weight = Parameter(w)
        self.bias = Parameter(b) if bias else None

    def _params_as(self, dtype):
        w = self.weight.data.astype(dtype, copy=False)
        b = None if self.bias is None else self.bias.data.astype(dtype, copy=False)
        return w, b

    def _accumulate(self, dw, db):
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None})"
        )


class Conv2d(_ConvBase):
    """2-D convolution, ``y = conv2d(x, weight, bias, stride, padding)``.

    Args:
        in_channels (C), out_channels (O): channel counts.
        kernel_size, stride, padding: int or (h, w) pair.
        bias: add a learnable bias.
        rng: numpy Generator for the initial values (default
            ``np.random.default_rng(0)``).

    Parameters (PyTorch names, shapes and default init):
        weight (O, C, kh, kw) and bias (O,), float32, both U(-1/sqrt(fan_in),
        1/sqrt(fan_in)) with fan_in = C*kh*kw (kaiming_uniform, a = sqrt(5)).

    forward: x (N, C, H, W) -> y (N, O, Ho, Wo); backward: dy -> dx (N, C, H, W).
    """

    def forward(self, x: np.ndarray) -> np.ndarray:
        w, b = self._params_as(getattr(x, "dtype", None) or np.float32)
        y = conv2d(x, w, b, self.stride, self.padding)
        self.save(x, w)
        return y

    def backward(self, grad_output: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        """dy -> dx; with ``need_input_grad=False`` only dW and db are made (dx is None)."""
        x, w = self.restore()
        dx, dw, db = conv2d_backward(grad_output, x, w, self.stride, self.padding, need_input_grad)
        self._accumulate(dw, db)
        return dx


class ConvTranspose2d(_ConvBase):
    """2-D transposed convolution, ``y = conv_transpose2d(x, weight, bias, stride, padding)``.

    Args:
        in_channels (C_in), out_channels (C_out), kernel_size, stride, padding,
        bias, rng: as :class:`Conv2d`.

    Parameters (PyTorch names, shapes and default init):
        weight (C_in, C_out, kh, kw) and bias (C_out,), float32, both
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with PyTorch's fan_in for this
        layout, C_out*kh*kw (it reads dimension 1 of the weight).

    forward: x (N, C_in, H, W) -> y (N, C_out, (H-1)*sh - 2*ph + kh, ...);
    backward: dy -> dx (N, C_in, H, W).
    """

    transposed = True

    def forward(self, x: np.ndarray) -> np.ndarray:
        w, b = self._params_as(getattr(x, "dtype", None) or np.float32)
        y = conv_transpose2d(x, w, b, self.stride, self.padding)
        self.save(x, w)
        return y

    def backward(self, grad_output: np.ndarray) -> np.ndarray:
        x, w = self.restore()
        dx, dw, db = conv_transpose2d_backward(grad_output, x, w, self.stride, self.padding)
        self._accumulate(dw, db)
        return dx
