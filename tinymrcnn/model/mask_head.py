"""The mask branch: a small FCN on 14x14 RoI features (docs/walkthrough.md#7-mask-branch).

    (R, D, 14, 14) -> [conv 3x3 + ReLU] x num_convs -> deconv 2x2/2 + ReLU
                   -> conv 1x1 to K channels -> (R, K, 28, 28) mask logits

One m x m mask per class (K = num_classes including background, as
torchvision), each an independent per-pixel sigmoid: the classification
branch picks the class, the mask branch only says which pixels belong to the
object *given* that class. The smallest form of the head (conv - ReLU - deconv -
1x1) is ``num_convs=1``.

Names follow torchvision's MaskRCNNHeads / MaskRCNNPredictor:
``mask_fcn1..N``, ``conv5_mask``, ``mask_fcn_logits``.
"""

from __future__ import annotations

import numpy as np

from ..nn import Conv2d, ConvTranspose2d, Module, ReLU


def _kaiming_normal_fan_out(conv, rng, transposed=False):
    w = conv.weight.data
    # Conv2d weight (O, C, kh, kw): fan_out = O*kh*kw; ConvTranspose2d (C_in, C_out, kh, kw):
    # PyTorch computes fan_out from dim 0 (C_in) there, and we follow it.
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    conv.weight.data = (rng.standard_normal(w.shape) * np.sqrt(2.0 / fan_out)).astype(w.dtype)
    if conv.bias is not None:
        conv.bias.data[...] = 0.0


class MaskHead(Module):
    def __init__(self, in_channels: int, channels: int, num_convs: int, num_classes: int, rng=None):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        self.num_convs = num_convs
        c_in = in_channels
        for i in range(1, num_convs + 1):
            conv = Conv2d(c_in, channels, 3, padding=1, rng=rng)
            _kaiming_normal_fan_out(conv, rng)
            setattr(self, f"mask_fcn{i}", conv)
            setattr(self, f"relu{i}", ReLU())
            c_in = channels
        self.conv5_mask = ConvTranspose2d(channels, channels, 2, stride=2, rng=rng)
        _kaiming_normal_fan_out(self.conv5_mask, rng, transposed=True)
        self.relu5 = ReLU()
        self.mask_fcn_logits = Conv2d(channels, num_classes, 1, rng=rng)
        _kaiming_normal_fan_out(self.mask_fcn_logits, rng)

    def forward(self, x):
        """x (R, D, m, m) RoI features -> (R, K, 2m, 2m) mask logits."""
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"mask_fcn{i}")(x))
        x = self.relu5(self.conv5_mask(x))
        return self.mask_fcn_logits(x)

    def backward(self, dy):
        d = self.conv5_mask.backward(self.relu5.backward(self.mask_fcn_logits.backward(dy)))
        for i in range(self.num_convs, 0, -1):
            d = getattr(self, f"mask_fcn{i}").backward(getattr(self, f"relu{i}").backward(d))
        return d  # (R, D, m, m)
