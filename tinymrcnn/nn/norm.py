"""Normalization layers: FrozenBatchNorm2d, BatchNorm2d, GroupNorm.

All three compute ``y = xhat * gamma + beta`` with ``xhat = (x - mu) / sqrt(var + eps)``;
they differ in where mu and var come from:

* FrozenBatchNorm2d: stored constants (pretrained torchvision backbones). The
  layer is an affine map per channel, ``y = x * scale + shift``.
* BatchNorm2d: in training, the statistics of the current batch over (N, H, W)
  per channel, and running averages are updated; in eval, the running averages.
* GroupNorm: the statistics of each sample over (C/G, H, W) per group of
  channels, the same in training and eval: independent of the batch size,
  which is why it trains from scratch at small batch (Wu & He, 2018).

When mu and var are statistics of x, the gradient also flows through them.
For a set of m values normalised together (a BN channel or a GN group):

    dxhat = dy * gamma
    dx    = (1 / (m * sigma)) * (m * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))
    dgamma = sum over (N, H, W) of dy * xhat,   dbeta = sum over (N, H, W) of dy

with sigma = sqrt(var + eps). The derivation is in docs/derivations/normalization.md.
Parameter and buffer names follow PyTorch so state dicts load unchanged.
"""

from __future__ import annotations

import numpy as np

from ..checks import check_float_array
from .module import Module, Parameter


def _check_nchw(x, C, name, finite=True):
    check_float_array(x, f"{name} input", ndim=4, finite=finite)
    if x.shape[1] != C:
        raise ValueError(f"{name} expects {C} channels, got input shape {x.shape}")


def _normalized_backward(dxhat, xhat, inv_std, axes):
    """dx from dxhat for values normalised together along ``axes``.

    ``dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`` with
    the means over ``axes`` (the m values that share one mu and var); the same
    as the formula in the module docstring divided through by m.
    """
    mean_d = dxhat.mean(axis=axes, keepdims=True)
    mean_dx = (dxhat * xhat).mean(axis=axes, keepdims=True)
    return inv_std * (dxhat - mean_d - xhat * mean_dx)


class FrozenBatchNorm2d(Module):
    """BatchNorm with fixed statistics and affine parameters (torchvision's).

    ``y = x * scale + shift`` with ``scale = weight / sqrt(running_var + eps)``
    and ``shift = bias - running_mean * scale``, per channel.

    Buffers (not trained, saved in state dicts under torchvision's names):
    weight, bias, running_mean, running_var, each (C,).

    Backward: ``dx = dy * scale``. Nothing here is trained, so no parameter
    gradients exist.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        C = int(num_features)
        self.num_features = C
        self.eps = float(eps)
        self.register_buffer("weight", np.ones(C, np.float32))
        self.register_buffer("bias", np.zeros(C, np.float32))
        self.register_buffer("running_mean", np.zeros(C, np.float32))
        self.register_buffer("running_var", np.ones(C, np.float32))

    def _scale_shift(self, dtype):
        # Same order of operations as torchvision: scale = w * rsqrt(rv + eps).
        scale = self.weight * (1.0 / np.sqrt(self.running_var + self.eps))
        shift = self.bias - self.running_mean * scale
        return scale.astype(dtype, copy=False), shift.astype(dtype, copy=False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, C, H, W) -> y (N, C, H, W)."""
        # No finiteness check: a NaN stays in its own cell here, nothing mixes values.
        _check_nchw(x, self.num_features, "FrozenBatchNorm2d", finite=False)
        scale, shift = self._scale_shift(x.dtype)
        self.save(scale)
        return x * scale[:, None, None] + shift[:, None, None]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        (scale,) = self.restore()
        return dy * scale[:, None, None]

    def __repr__(self) -> str:
        return f"FrozenBatchNorm2d({self.num_features}, eps={self.eps})"


class BatchNorm2d(Module):
    """Batch normalization over (N, H, W) for each channel (PyTorch semantics).

    Training: ``mu``, ``var`` = mean and *biased* variance of the batch per
    channel; the output uses them; the running statistics move towards them:
    ``running = (1 - momentum) * running + momentum * stat``, with the
    *unbiased* variance (``var * m / (m - 1)``) for running_var, as PyTorch.
    Eval: ``mu``, ``var`` = running_mean, running_var (an affine map, no cache).

    Parameters: weight (C,) = 1, bias (C,) = 0.
    Buffers: running_mean (C,), running_var (C,), num_batches_tracked () int64.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        C = int(num_features)
        self.num_features = C
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.weight = Parameter(np.ones(C, np.float32))
        self.bias = Parameter(np.zeros(C, np.float32))
        self.register_buffer("running_mean", np.zeros(C, np.float32))
        self.register_buffer("running_var", np.ones(C, np.float32))
        self.register_buffer("num_batches_tracked", np.array(0, np.int64))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, C, H, W) -> y (N, C, H, W)."""
        _check_nchw(x, self.num_features, "BatchNorm2d")
        dt = x.dtype
        gamma = self.weight.data.astype(dt, copy=False)[:, None, None]  # (C, 1, 1)
        beta = self.bias.data.astype(dt, copy=False)[:, None, None]
        if not self.training:
            inv_std = (1.0 / np.sqrt(self.running_var + self.eps)).astype(dt)
            scale = gamma * inv_std[:, None, None]
            return x * scale + (beta - self.running_mean.astype(dt)[:, None, None] * scale)
        N, _, H, W = x.shape
        m = N * H * W
        if m < 2:
            raise ValueError(
                f"BatchNorm2d in training needs more than one value per channel, got input shape {x.shape}"
            )
        mu = x.mean(axis=(0, 2, 3), keepdims=True)  # (1, C, 1, 1)
        xc = x - mu
        var = (xc * xc).mean(axis=(0, 2, 3), keepdims=True)  # biased, for normalising
        inv_std = 1.0 / np.sqrt(var + dt.type(self.eps))
        xhat = xc * inv_std  # (N, C, H, W)
        # Running statistics (PyTorch: unbiased variance, momentum on the new value).
        mom = self.momentum
        rm, rv = self.running_mean, self.running_var
        self.running_mean = ((1 - mom) * rm + mom * mu.ravel()).astype(rm.dtype)
        self.running_var = ((1 - mom) * rv + mom * var.ravel() * (m / (m - 1))).astype(rv.dtype)
        self.num_batches_tracked = np.array(self.num_batches_tracked + 1, np.int64)
        self.save(xhat, inv_std)
        return xhat * gamma + beta

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy (N, C, H, W) -> dx; adds dgamma = sum(dy * xhat), dbeta = sum(dy) per channel."""
        xhat, inv_std = self.restore()
        self.weight.accumulate((dy * xhat).sum(axis=(0, 2, 3)))
        self.bias.accumulate(dy.sum(axis=(0, 2, 3)))
        dxhat = dy * self.weight.data.astype(dy.dtype, copy=False)[:, None, None]
        return _normalized_backward(dxhat, xhat, inv_std, axes=(0, 2, 3))

    def __repr__(self) -> str:
        return f"BatchNorm2d({self.num_features}, eps={self.eps}, momentum={self.momentum})"


class GroupNorm(Module):
    """Group normalization (Wu & He, 2018), PyTorch ``nn.GroupNorm`` semantics.

    The C channels are split into ``num_groups`` groups of C/G consecutive
    channels; each sample's group is normalised with its own mean and biased
    variance over (C/G, *spatial), then scaled and shifted per channel.

    Args:
        num_groups: G, must divide num_channels.
        num_channels: C.
        eps: added to the variance.

    Shapes: x (N, C, *) (usually (N, C, H, W)) -> y of the same shape.
    Parameters: weight (C,) = 1, bias (C,) = 0.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        G, C = int(num_groups), int(num_channels)
        if G < 1 or C % G != 0:
            raise ValueError(f"GroupNorm: num_channels ({C}) must be divisible by num_groups ({G})")
        self.num_groups, self.num_channels, self.eps = G, C, float(eps)
        self.weight = Parameter(np.ones(C, np.float32))
        self.bias = Parameter(np.zeros(C, np.float32))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (N, C, *) -> y (N, C, *)."""
        check_float_array(x, "GroupNorm input")
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm expects input (N, {self.num_channels}, ...), got shape {x.shape}")
        dt = x.dtype
        N, G = x.shape[0], self.num_groups
        xg = x.reshape(N, G, -1)  # (N, G, C/G * H * W)
        mu = xg.mean(axis=2, keepdims=True)  # (N, G, 1)
        xc = xg - mu
        var = (xc * xc).mean(axis=2, keepdims=True)  # biased
        inv_std = 1.0 / np.sqrt(var + dt.type(self.eps))
        xhat = (xc * inv_std).reshape(x.shape)  # (N, C, *)
        bshape = (1, self.num_channels) + (1,) * (x.ndim - 2)
        gamma = self.weight.data.astype(dt, copy=False).reshape(bshape)
        beta = self.bias.data.astype(dt, copy=False).reshape(bshape)
        self.save(xhat, inv_std)
        return xhat * gamma + beta

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy (N, C, *) -> dx; adds dgamma = sum(dy * xhat), dbeta = sum(dy) per channel."""
        xhat, inv_std = self.restore()
        axes = (0,) + tuple(range(2, dy.ndim))  # all but the channel axis
        self.weight.accumulate((dy * xhat).sum(axis=axes))
        self.bias.accumulate(dy.sum(axis=axes))
        bshape = (1, self.num_channels) + (1,) * (dy.ndim - 2)
        dxhat = dy * self.weight.data.astype(dy.dtype, copy=False).reshape(bshape)
        N, G = dy.shape[0], self.num_groups
        dx = _normalized_backward(dxhat.reshape(N, G, -1), xhat.reshape(N, G, -1), inv_std, axes=2)
        return dx.reshape(dy.shape)

    def __repr__(self) -> str:
        return f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps})"
