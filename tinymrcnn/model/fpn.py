"""Feature Pyramid Network: C2..C5 -> P2..P6 (docs/semantics.md#backbone-and-fpn).

    last = lateral5(C5);                        P5 = out5(last)
    last = lateral4(C4) + up(last, C4's size);  P4 = out4(last)
    last = lateral3(C3) + up(last, C3's size);  P3 = out3(last)
    last = lateral2(C2) + up(last, C2's size);  P2 = out2(last)
    P6 = P5[:, :, ::2, ::2]        (max-pool kernel 1, stride 2; RPN only)

Backward (docs/derivations/fpn.md). Each ``last_k`` feeds two places: its own
output conv and, through the upsampling, the level below. So its gradient is
the sum of both, and the levels must be visited bottom-up (P2 first), because
``d last_k`` needs ``d last_{k-1}`` from the level below:

    d last_2 = out2^T dP2
    d last_k = out_k^T dP_k + up^T(d last_{k-1})        k = 3, 4, 5
    dC_k     = lateral_k^T d last_k
    dP5     += scatter of dP6 onto P5[:, :, ::2, ::2]

The gradients dP_k arriving here are already sums over every consumer of
that level (RPN head on P2..P6, RoI heads on P2..P5).
"""

from __future__ import annotations

import numpy as np

from ..nn import Conv2d, Module
from ..nn.upsample import upsample_nearest, upsample_nearest_backward


class FPN(Module):
    """Lateral 1x1 and output 3x3 convs per level, no activation (as torchvision).

    Parameter names follow torchvision's FeaturePyramidNetwork:
    ``inner_blocks.{0..3}`` (laterals, C2..C5) and ``layer_blocks.{0..3}``.
    """

    def __init__(self, in_channels: tuple, out_channels: int, rng=None):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        from ..nn import Sequential

        # Sequential gives the "inner_blocks.0.weight" naming of torchvision.
        self.inner_blocks = Sequential(*[Conv2d(c, out_channels, 1, rng=rng) for c in in_channels])
        self.layer_blocks = Sequential(
            *[Conv2d(out_channels, out_channels, 3, padding=1, rng=rng) for _ in in_channels]
        )
        # torchvision initialises FPN convs with kaiming_uniform(a=1) and zero bias.
        for conv in list(self.inner_blocks) + list(self.layer_blocks):
            o, c, kh, kw = conv.weight.data.shape
            bound = np.sqrt(3.0 / (c * kh * kw))
            conv.weight.data = rng.uniform(-bound, bound, conv.weight.data.shape).astype(conv.weight.data.dtype)
            conv.bias.data[...] = 0.0
        self.out_channels = out_channels

    def forward(self, feats):
        """feats: [C2, C3, C4, C5], each (N, C_k, H_k, W_k).

        Returns [P2, P3, P4, P5, P6], each (N, D, H_k, W_k); P6 is (N, D, ceil(H5/2), ceil(W5/2)).
        """
        n_levels = len(feats)
        outs = [None] * n_levels
        last = self.inner_blocks[n_levels - 1](feats[-1])
        outs[-1] = self.layer_blocks[n_levels - 1](last)
        lasts = [None] * n_levels
        lasts[-1] = last
        for k in range(n_levels - 2, -1, -1):
            lateral = self.inner_blocks[k](feats[k])  # (N, D, H_k, W_k)
            last = lateral + upsample_nearest(last, lateral.shape[-2:])  # top-down path
            lasts[k] = last
            outs[k] = self.layer_blocks[k](last)
        p6 = np.ascontiguousarray(outs[-1][:, :, ::2, ::2])
        self.save(tuple(l.shape for l in lasts))
        return outs + [p6]

    def backward(self, grads):
        """grads: [dP2, dP3, dP4, dP5, dP6] (None where a level got no gradient).

        Returns [dC2, dC3, dC4, dC5].
        """
        (shapes,) = self.restore()
        n_levels = len(shapes)
        d_levels = list(grads[:n_levels])
        d_p6 = grads[n_levels]
        if d_p6 is not None:
            # P6 = P5[:, :, ::2, ::2]: each P6 cell copies one P5 cell.
            d5 = np.zeros(shapes[-1], dtype=d_p6.dtype) if d_levels[-1] is None else d_levels[-1].copy()
            d5[:, :, ::2, ::2] += d_p6
            d_levels[-1] = d5
        d_feats = [None] * n_levels
        d_last_below = None
        for k in range(n_levels):  # bottom-up
            d_last = None
            if d_levels[k] is not None:
                d_last = self.layer_blocks[k].backward(d_levels[k])
            if d_last_below is not None:
                up = upsample_nearest_backward(d_last_below, shapes[k])
                d_last = up if d_last is None else d_last + up
            if d_last is None:
                d_feats[k] = None
                d_last_below = None
                continue
            d_feats[k] = self.inner_blocks[k].backward(d_last)
            d_last_below = d_last
        return d_feats
