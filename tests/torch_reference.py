"""The torchvision_r50_fpn preset's layers written with torch.nn.functional (test and benchmark helper).

An independent re-statement of what torchvision's maskrcnn_resnet50_fpn
computes in its convolutional stages, read straight from a *tinymrcnn*-named
state dict (NumPy arrays), so tinymrcnn's wiring of the preset can be checked
where torch is installed but torchvision is not:

    backbone_fpn(x)  ResNet-50 (FrozenBatchNorm as x * w / sqrt(rv + eps) + (b - rm * scale)),
                     FPN with nearest upsampling to the lateral's exact size, P6 = max_pool(P5, 1, 2)
    rpn_head(p)      3x3 conv + ReLU, 1x1 objectness, 1x1 deltas
    box_head(f)      flatten, fc6 + ReLU, fc7 + ReLU, cls_score, bbox_pred
    mask_head(f)     4 x (3x3 conv + ReLU), 2x2/2 transposed conv + ReLU, 1x1 conv

RoIAlign, anchors, proposals and NMS are not here: they need torchvision's ops.
Only imported by code that has already checked that torch is installed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class TorchReference:
    """Holds the weights as torch tensors; every method takes and returns torch tensors."""

    def __init__(self, state: dict, blocks_per_stage=(3, 4, 6, 3), mask_num_convs: int = 4, bn_eps: float = 1e-5):
        self.w = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
        self.blocks_per_stage = tuple(blocks_per_stage)
        self.mask_num_convs = mask_num_convs
        self.eps = bn_eps

    # -- backbone ------------------------------------------------------------------
    def _bn(self, x, name):
        w = self.w
        scale = w[name + ".weight"] * (w[name + ".running_var"] + self.eps).rsqrt()
        shift = w[name + ".bias"] - w[name + ".running_mean"] * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def _bottleneck(self, x, name, stride):
        w = self.w
        out = F.relu(self._bn(F.conv2d(x, w[name + ".conv1.weight"]), name + ".bn1"))
        out = F.relu(self._bn(F.conv2d(out, w[name + ".conv2.weight"], stride=stride, padding=1), name + ".bn2"))
        out = self._bn(F.conv2d(out, w[name + ".conv3.weight"]), name + ".bn3")
        if name + ".downsample.0.weight" in w:
            x = self._bn(F.conv2d(x, w[name + ".downsample.0.weight"], stride=stride), name + ".downsample.1")
        return F.relu(out + x)

    def body(self, x):
        """(N, 3, H, W) -> [C2, C3, C4, C5]."""
        p = "backbone.body."
        x = F.relu(self._bn(F.conv2d(x, self.w[p + "conv1.weight"], stride=2, padding=3), p + "bn1"))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        feats = []
        for stage, n_blocks in enumerate(self.blocks_per_stage, start=1):
            for i in range(n_blocks):
                x = self._bottleneck(x, f"{p}layer{stage}.{i}", 2 if (i == 0 and stage > 1) else 1)
            feats.append(x)
        return feats

    def fpn(self, feats):
        """[C2..C5] -> [P2, P3, P4, P5, P6]."""
        w, p = self.w, "backbone.fpn."
        n = len(feats)
        last = F.conv2d(feats[-1], w[f"{p}inner_blocks.{n - 1}.weight"], w[f"{p}inner_blocks.{n - 1}.bias"])
        outs = [F.conv2d(last, w[f"{p}layer_blocks.{n - 1}.weight"], w[f"{p}layer_blocks.{n - 1}.bias"], padding=1)]
        for k in range(n - 2, -1, -1):
            lateral = F.conv2d(feats[k], w[f"{p}inner_blocks.{k}.weight"], w[f"{p}inner_blocks.{k}.bias"])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, F.conv2d(last, w[f"{p}layer_blocks.{k}.weight"], w[f"{p}layer_blocks.{k}.bias"], padding=1))
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
        return outs

    def backbone_fpn(self, x):
        return self.fpn(self.body(x))

    # -- heads ---------------------------------------------------------------------
    def rpn_head(self, p):
        w = self.w
        t = F.relu(F.conv2d(p, w["rpn.head.conv.weight"], w["rpn.head.conv.bias"], padding=1))
        return (
            F.conv2d(t, w["rpn.head.cls_logits.weight"], w["rpn.head.cls_logits.bias"]),
            F.conv2d(t, w["rpn.head.bbox_pred.weight"], w["rpn.head.bbox_pred.bias"]),
        )

    def box_head(self, feats):
        """(R, 256, 7, 7) -> class logits (R, K), box regression (R, 4K)."""
        w, p = self.w, "roi_heads."
        h = feats.flatten(start_dim=1)
        h = F.relu(F.linear(h, w[p + "box_head.fc6.weight"], w[p + "box_head.fc6.bias"]))
        h = F.relu(F.linear(h, w[p + "box_head.fc7.weight"], w[p + "box_head.fc7.bias"]))
        return (
            F.linear(h, w[p + "box_predictor.cls_score.weight"], w[p + "box_predictor.cls_score.bias"]),
            F.linear(h, w[p + "box_predictor.bbox_pred.weight"], w[p + "box_predictor.bbox_pred.bias"]),
        )

    def mask_head(self, feats):
        """(R, 256, 14, 14) -> mask logits (R, K, 28, 28)."""
        w, p = self.w, "roi_heads.mask_head."
        x = feats
        for i in range(1, self.mask_num_convs + 1):
            x = F.relu(F.conv2d(x, w[f"{p}mask_fcn{i}.weight"], w[f"{p}mask_fcn{i}.bias"], padding=1))
        x = F.relu(F.conv_transpose2d(x, w[p + "conv5_mask.weight"], w[p + "conv5_mask.bias"], stride=2))
        return F.conv2d(x, w[p + "mask_fcn_logits.weight"], w[p + "mask_fcn_logits.bias"])
