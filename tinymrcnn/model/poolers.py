"""Multi-scale RoI feature extraction: which FPN level pools each RoI, then pool it.

FPN (Lin et al. 2017, eq. 1) assigns an RoI of width w and height h (input
pixels) to pyramid level

    k = floor(k0 + log2(sqrt(w h) / 224) + eps),   clamped to [2, 5],

so a 224x224 RoI (ImageNet's canonical size) pools from P4 (k0 = 4), one
half its size from P3, and so on (docs/semantics.md#multi-scale-roi-level-mapping;
docs/walkthrough.md#5-roialign). Level k has stride 2^k, so it is pooled with
``spatial_scale = 2^-k``.

:class:`MultiScaleRoIAlign` pools every RoI from its level and puts the results
back in RoI order; its backward scatters each RoI's gradient into the level
it came from. The pooling op is a switch, so the paper's Table 2c ablation
(RoIPool vs RoIAlign max vs RoIAlign avg) is one argument.

``pooler.device = "cuda"`` (MaskRCNN sets it from ``config.device``) runs
RoIAlign, avg and max, forward and backward, on the numba.cuda kernels of
``tinymrcnn.kernels.cuda.roi_align``: each level that has RoIs is copied to the
GPU, pooled in one launch, and the result copied back into RoI order. RoIPool
stays on the CPU.
"""
from __future__ import annotations

import numpy as np

from ..checks import check_float_array, pair
from ..nn import Module
from ..ops.roi_align import (ChannelsLast, channels_last, check_rois, roi_align_levels,
                             roi_align_levels_backward)
from ..ops.roi_pool import roi_pool, roi_pool_backward


class LevelMapper:
    """Map boxes to FPN levels: k = floor(k0 + log2(sqrt(area) / s0) + eps), clamped.

    Args:
        canonical_scale: s0, 224 (ImageNet pre-training size).
        canonical_level: k0, 4: the level a canonical-size box goes to.
        k_min, k_max: the levels available, 2..5 (P2..P5).
        eps: 1e-6 *outside* the log, as torchvision today (older torchvision
            put it inside; detectron2 uses 1e-8 inside). It keeps a box of
            exactly 112 px on P3 despite log2 rounding.
    """

    def __init__(self, canonical_scale: float = 224.0, canonical_level: int = 4,
                 k_min: int = 2, k_max: int = 5, eps: float = 1e-6):
        if k_min > k_max:
            raise ValueError(f"k_min {k_min} > k_max {k_max}")
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = int(canonical_level)
        self.k_min, self.k_max, self.eps = int(k_min), int(k_max), float(eps)

    def __call__(self, boxes: np.ndarray) -> np.ndarray:
        """boxes (K, 4) [x1, y1, x2, y2] -> levels (K,) int64 in [k_min, k_max].

        A box whose area is zero, negative or NaN goes to k_min (the log is
        -inf or NaN; torchvision leaves that case undefined).
        """
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (K, 4), got {boxes.shape}")
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.floor(self.canonical_level + np.log2(np.sqrt(area) / self.canonical_scale)
                         + self.eps)
        k = np.where(np.isnan(k), self.k_min, k)
        return np.clip(k, self.k_min, self.k_max).astype(np.int64)


class MultiScaleRoIAlign(Module):
    """Pool (ph, pw) features for each RoI from its FPN level.

    Args:
        output_size: int or (ph, pw); 7 for the box head, 14 for the mask head.
        sampling_ratio: RoIAlign's points per bin side (<= 0: adaptive).
        aligned: RoIAlign's half-pixel offset (torchvision False, detectron2 True).
        op: "roi_align" or "roi_pool" (Fast R-CNN's quantised max pooling).
        mode: RoIAlign's "avg" or "max" (ignored by roi_pool).
        levels: the pyramid levels the feature list holds, (2, 3, 4, 5).
        canonical_scale, canonical_level, eps: the :class:`LevelMapper`'s.

    forward(features, rois):
        features: list of (N, C, H_l, W_l) arrays (or :class:`ChannelsLast`
            from ``channels_last``, made once and shared by the box and mask
            poolers), one per level, P2 first; level k has stride 2^k.
        rois: (K, 5) [batch_index, x1, y1, x2, y2], input pixels.
        -> (K, C, ph, pw) in RoI order.

    backward(dy): dy (K, C, ph, pw) -> list of (N, C, H_l, W_l) gradients,
        one per level (zeros for a level no RoI was assigned to).
    """

    def __init__(self, output_size=7, sampling_ratio=2, aligned=False, op="roi_align", mode="avg",
                 levels=(2, 3, 4, 5), canonical_scale=224.0, canonical_level=4, eps=1e-6):
        super().__init__()
        if op not in ("roi_align", "roi_pool"):
            raise ValueError(f'op must be "roi_align" or "roi_pool", got {op!r}')
        if mode not in ("avg", "max"):
            raise ValueError(f'mode must be "avg" or "max", got {mode!r}')
        self.output_size = output_size
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.op, self.mode = op, mode
        self.levels = tuple(int(k) for k in levels)
        self.mapper = LevelMapper(canonical_scale, canonical_level, min(self.levels),
                                  max(self.levels), eps)
        self.device = "cpu"       # "cuda": RoIAlign on the GPU (see the module docstring)

    def map_levels(self, rois: np.ndarray) -> np.ndarray:
        """The FPN level (2..5) each RoI pools from: (K,) int64."""
        return self.mapper(np.asarray(rois)[:, 1:5])

    def forward(self, features, rois):
        if len(features) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature maps (levels {self.levels}), "
                             f"got {len(features)}")
        n = features[0].shape[0]
        rois = check_rois(rois, n)
        level = self.map_levels(rois) - min(self.levels)              # (K,) index into features
        scales = [2.0 ** -k for k in self.levels]                      # level k has stride 2^k
        shapes = [tuple(f.shape) for f in features]
        if self.op == "roi_align" and self.device == "cuda":
            return self._roi_align_cuda(features, rois, level, scales, shapes)
        if self.op == "roi_align":
            if self.mode == "max":    # max's backward needs the maps: convert them once, here
                features = [channels_last(f) for f in features]
            # one parallel pass over all RoIs, each from its own level, written in RoI order
            out = roi_align_levels(features, rois, level, scales, self.output_size,
                                   self.sampling_ratio, self.aligned, self.mode)
            self.save(rois, level, shapes, features if self.mode == "max" else None)
            return out
        # roi_pool: one call per level, results put back in RoI order
        outs, argmaxes = [], []
        for i, f in enumerate(features):
            idx = np.flatnonzero(level == i)
            y, argmax = roi_pool(f.numpy() if isinstance(f, ChannelsLast) else f, rois[idx],
                                 self.output_size, scales[i])
            outs.append((idx, y))
            argmaxes.append((idx, argmax))
        c, ph, pw = outs[0][1].shape[1:]
        out = np.zeros((len(rois), c, ph, pw), dtype=features[0].dtype)
        for idx, y in outs:
            out[idx] = y
        self.save(rois, level, shapes, argmaxes)
        return out

    def backward(self, dy):
        rois, level, shapes, saved = self.restore()
        scales = [2.0 ** -k for k in self.levels]
        if self.op == "roi_align" and self.device == "cuda":
            return self._roi_align_backward_cuda(dy, rois, level, scales, shapes, saved)
        if self.op == "roi_align":
            return roi_align_levels_backward(dy, rois, level, scales, shapes, self.sampling_ratio,
                                             self.aligned, self.mode, features=saved)
        return [roi_pool_backward(np.ascontiguousarray(dy[idx]), argmax, shape)
                for (idx, argmax), shape in zip(saved, shapes)]

    # -- the GPU path (device == "cuda") ---------------------------------------------
    def _roi_align_cuda(self, features, rois, level, scales, shapes):
        """RoIAlign of every RoI on the GPU, one launch per level; (K, C, ph, pw) on the host."""
        from ..kernels.cuda.device import to_device, to_host
        from ..kernels.cuda.roi_align import roi_align_forward_cuda
        ph, pw = pair(self.output_size, "output_size")
        out = np.zeros((len(rois), shapes[0][1], ph, pw), dtype=features[0].dtype)
        maps = [None] * len(features)             # device copies of the levels that have RoIs
        for i, f in enumerate(features):
            idx = np.flatnonzero(level == i)
            if idx.size == 0:
                continue
            if isinstance(f, ChannelsLast):       # already checked; the kernel reads NCHW
                f = f.numpy()
            else:
                check_float_array(f, f"features[{i}]", ndim=4)
            maps[i] = to_device(f)
            out[idx] = to_host(roi_align_forward_cuda(maps[i], rois[idx], (ph, pw), scales[i],
                                                      self.sampling_ratio, self.aligned, self.mode))
        self.save(rois, level, shapes, maps if self.mode == "max" else None)
        return out

    def _roi_align_backward_cuda(self, dy, rois, level, scales, shapes, maps):
        """Per-level gradients (atomic adds on the GPU), copied back; zeros for unused levels."""
        from ..kernels.cuda.device import to_device, to_host
        from ..kernels.cuda.roi_align import roi_align_backward_cuda
        grads = []
        for i, shape in enumerate(shapes):
            idx = np.flatnonzero(level == i)
            if idx.size == 0:
                grads.append(np.zeros(shape, dy.dtype))
                continue
            grads.append(to_host(roi_align_backward_cuda(
                to_device(dy[idx]), rois[idx], shape, scales[i], self.sampling_ratio, self.aligned,
                self.mode, x_dev=None if maps is None else maps[i])))
        return grads
