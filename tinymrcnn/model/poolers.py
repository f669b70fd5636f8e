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

The pooler itself knows nothing of devices: it calls the ops
(``tinymrcnn.ops.roi_align_levels`` and its backward), which run on the
active kernels (``tinymrcnn.kernels``). RoI pooling runs on the CPU.
"""

from __future__ import annotations

import numpy as np

from ..checks import check_rois
from ..nn import Module
from ..ops.roi_align import roi_align_levels, roi_align_levels_backward, roi_feature_maps
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

    def __init__(
        self,
        canonical_scale: float = 224.0,
        canonical_level: int = 4,
        k_min: int = 2,
        k_max: int = 5,
        eps: float = 1e-6,
    ):
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
            k = np.floor(self.canonical_level + np.log2(np.sqrt(area) / self.canonical_scale) + self.eps)
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
        features: list of (N, C, H_l, W_l) arrays, one per level, P2 first
            (level k has stride 2^k), or :meth:`prepare` of that list, made
            once and shared by the box and the mask pooler.
        rois: (K, 5) [batch_index, x1, y1, x2, y2], input pixels.
        -> (K, C, ph, pw) in RoI order.

    backward(dy): dy (K, C, ph, pw) -> list of (N, C, H_l, W_l) gradients,
        one per level (zeros for a level no RoI was assigned to).
    """

    def __init__(
        self,
        output_size=7,
        sampling_ratio=2,
        aligned=False,
        op="roi_align",
        mode="avg",
        levels=(2, 3, 4, 5),
        canonical_scale=224.0,
        canonical_level=4,
        eps=1e-6,
    ):
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
        self.mapper = LevelMapper(canonical_scale, canonical_level, min(self.levels), max(self.levels), eps)

    def map_levels(self, rois: np.ndarray) -> np.ndarray:
        """The FPN level (2..5) each RoI pools from: (K,) int64."""
        return self.mapper(np.asarray(rois)[:, 1:5])

    def prepare(self, features):
        """The pyramid as the pooling op reads it: for RoIAlign, laid out for its kernels
        once (:func:`tinymrcnn.ops.roi_feature_maps`); RoI pooling reads it as it is."""
        return roi_feature_maps(features) if self.op == "roi_align" else features

    def forward(self, features, rois):
        if len(features) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature maps (levels {self.levels}), got {len(features)}")
        features = self.prepare(features)
        rois = check_rois(rois, features[0].shape[0])
        level = self.map_levels(rois) - min(self.levels)  # (K,) index into features
        self.save(features, rois, level)
        if self.op == "roi_align":  # one pass over all RoIs, each from its own level, in RoI order
            return roi_align_levels(
                features, rois, level, self.scales, self.output_size, self.sampling_ratio, self.aligned, self.mode
            )
        out = None  # roi_pool: one call per level, results put back in RoI order
        for i, f in enumerate(features):
            idx = np.flatnonzero(level == i)
            y = roi_pool(f, rois[idx], self.output_size, self.scales[i])
            out = np.zeros((len(rois),) + y.shape[1:], y.dtype) if out is None else out
            out[idx] = y
        return out

    def backward(self, dy):
        features, rois, level = self.restore()
        if self.op == "roi_align":
            return roi_align_levels_backward(
                dy, features, rois, level, self.scales, self.output_size, self.sampling_ratio, self.aligned, self.mode
            )
        return [
            roi_pool_backward(
                np.ascontiguousarray(dy[level == i]), f, rois[level == i], self.output_size, self.scales[i]
            )
            for i, f in enumerate(features)
        ]

    @property
    def scales(self):
        """Each level's spatial scale: level k has stride 2^k."""
        return [2.0**-k for k in self.levels]
