"""MaskRCNNConfig: every constant of the pipeline in one dataclass.

Two presets:

* :meth:`MaskRCNNConfig.shapes` -- the toy default. A small GroupNorm ResNet
  trained from scratch on 128x128 shapes images on a laptop CPU.
* :meth:`MaskRCNNConfig.torchvision_r50_fpn` -- the values of torchvision's
  ``maskrcnn_resnet50_fpn`` (docs/semantics.md), so that with the same weights
  tinymrcnn computes the same thing.

Field names say which stage uses them (``rpn_*``, ``box_*``, ``mask_*``).
Where torchvision and detectron2 differ, a field is the switch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass


@dataclass
class MaskRCNNConfig:
    # ---- classes --------------------------------------------------------
    num_classes: int = 4  # including background (label 0)
    class_names: tuple = ("background", "square", "circle", "triangle")

    # ---- input transform (docs/semantics.md#input-transform) -----------------
    min_size: int | None = None  # resize short side to this; None keeps the size
    max_size: int | None = None  # cap on the long side (torchvision: 1333)
    image_mean: tuple = (0.485, 0.456, 0.406)
    image_std: tuple = (0.229, 0.224, 0.225)
    size_divisible: int = 32  # zero-pad H and W up to a multiple of this

    # ---- backbone (docs/semantics.md#backbone-and-fpn) ------------------------
    block: str = "basic"  # "basic" (ResNet-18/34) or "bottleneck" (ResNet-50+)
    blocks_per_stage: tuple = (2, 2, 2, 2)  # layer1..layer4
    stem_channels: int = 64
    stage_channels: tuple = (64, 128, 256, 512)  # output channels of C2..C5
    norm: str = "group"  # "group", "batch" or "frozen_bn"
    group_norm_groups: int = 32  # capped so every group has >= 4 channels
    frozen_stages: int = 0  # 0: train all; 1: freeze stem; k: stem + layer1..k-1
    stem_maxpool: bool = True

    # ---- FPN -------------------------------------------------------------
    fpn_channels: int = 256

    # ---- anchors (docs/semantics.md#anchors) -----------------------------------
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # per level P2..P6: a size, or a tuple of sizes
    aspect_ratios: tuple = (0.5, 1.0, 2.0)  # h / w
    anchor_cell_centered: bool = False  # torchvision: False (centres at cell corners)

    # ---- RPN (docs/semantics.md#proposal-layer) ----------------------------
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_score_thresh: float = 0.0
    rpn_min_size: float = 1e-3
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_smooth_l1_beta: float = 1.0 / 9

    # ---- RoI feature extraction (docs/semantics.md#roialign) -------------------
    roi_op: str = "roi_align"  # "roi_align" or "roi_pool" (Table 2c ablation)
    roi_align_mode: str = "avg"  # "avg" or "max" (docs/semantics.md#roialign)
    roi_aligned: bool = False  # half-pixel offset (detectron2: True)
    roi_sampling_ratio: int = 2  # <= 0: adaptive ceil(roi / bins)
    canonical_scale: float = 224.0
    canonical_level: int = 4
    box_roi_size: int = 7
    mask_roi_size: int = 14

    # ---- box head (docs/semantics.md#box-head) ----------------------------------
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_coder_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    box_representation_size: int = 1024  # TwoMLPHead width
    box_smooth_l1_beta: float = 1.0 / 9  # 0 gives plain L1 (detectron2)
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    # after the per-class NMS, a detection overlapping (IoU > box_nms_thresh) a
    # higher-scoring one of another class has its score multiplied by this;
    # 1.0 (torchvision) leaves the scores alone (ops/nms.py: decay_across_classes)
    box_cross_class_decay: float = 1.0
    box_detections_per_img: int = 100
    box_min_size: float = 1e-2

    # ---- mask head (docs/semantics.md#mask-head) --------------------------------
    mask_num_convs: int = 4
    mask_channels: int = 256
    mask_target_mode: str = "soft"  # "soft" (torchvision) or "threshold" (detectron2)
    mask_target_aligned: bool = False  # RoIAlign of GT masks: torchvision False
    mask_loss_type: str = "sigmoid"  # "sigmoid" (per class) or "softmax" (Table 2b)
    # The mask branch trains on every positive RoI (None, as torchvision), or on
    # at most this many per image, drawn at random: neighbouring positives of one
    # object give nearly the same mask target, and the mask head is the most
    # expensive stage of a CPU training step.
    mask_batch_size_per_image: int | None = None
    # Pasting the M x M probabilities into the image (docs/semantics.md#pasting-masks-into-the-image):
    # False casts the box to whole pixels (torchvision), True reads the map at every
    # pixel's centre inside the exact box (detectron2), the inverse of aligned targets.
    mask_paste_aligned: bool = False

    # ---- numerics ----------------------------------------------------------
    dtype: str = "float32"
    # BLAS threads inside tinymrcnn.runtime.session (training, evaluation, the CLI,
    # the benchmarks; None: leave the process's setting alone; 0: the CPU's cores,
    # shared out among the data-parallel workers). 1 is fastest for the small
    # shapes model: its products are too small to split, the Numba kernels already
    # run in parallel, and OpenBLAS's spin-waiting threads steal their cores
    # (measured on 2 cores: 0.53 s per training step instead of 4.6 s). The
    # ResNet-50 preset's large products do gain from every core (README, Speed).
    blas_threads: int | None = 1
    # Where the convolutions and RoIAlign run: "cpu" (NumPy + Numba, the default)
    # or "cuda" (the numba.cuda kernels; float32 only). docs/gpu.md says what
    # runs where; tinymrcnn.runtime.session checks for a usable GPU when it starts.
    device: str = "cpu"

    # ------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""

        def need(cond, msg):
            if not cond:
                raise ValueError(f"MaskRCNNConfig: {msg}")

        need(self.num_classes >= 2, f"num_classes must count background too (>= 2), got {self.num_classes}")
        need(
            len(self.class_names) == self.num_classes,
            f"class_names has {len(self.class_names)} names for num_classes={self.num_classes}",
        )
        need(self.block in ("basic", "bottleneck"), f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        need(len(self.blocks_per_stage) == 4, "blocks_per_stage needs 4 entries (layer1..layer4)")
        need(len(self.stage_channels) == 4, "stage_channels needs 4 entries (C2..C5)")
        need(self.norm in ("group", "batch", "frozen_bn"), f"unknown norm {self.norm!r}")
        need(0 <= self.frozen_stages <= 5, f"frozen_stages must be in 0..5, got {self.frozen_stages}")
        need(len(self.anchor_sizes) == 5, "anchor_sizes needs one entry per level P2..P6")
        per_level = self.anchor_sizes_per_level
        need(
            all(
                len(s) == len(per_level[0])
                and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in s)
                for s in per_level
            ),
            f"anchor_sizes needs the same number of sizes (positive numbers) on every level (the RPN head "
            f"is shared across levels), got {self.anchor_sizes}",
        )
        need(self.roi_op in ("roi_align", "roi_pool"), f"roi_op must be roi_align or roi_pool, got {self.roi_op!r}")
        need(self.roi_align_mode in ("avg", "max"), f"roi_align_mode must be avg or max, got {self.roi_align_mode!r}")
        need(self.mask_target_mode in ("soft", "threshold"), f"unknown mask_target_mode {self.mask_target_mode!r}")
        need(self.mask_loss_type in ("sigmoid", "softmax"), f"unknown mask_loss_type {self.mask_loss_type!r}")
        need(self.dtype in ("float32", "float64"), f"dtype must be float32 or float64, got {self.dtype!r}")
        need(self.device in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda', got {self.device!r}")
        need(
            self.device == "cpu" or self.dtype == "float32",
            f"device='cuda' runs float32 kernels; dtype must be float32, got {self.dtype!r}",
        )
        need(
            self.blas_threads is None or (isinstance(self.blas_threads, int) and self.blas_threads >= 0),
            f"blas_threads must be None, 0 (the cores, shared among workers) or a thread count, got {self.blas_threads!r}",
        )
        need(self.size_divisible >= 1, "size_divisible must be >= 1")
        need(
            0.0 <= self.box_cross_class_decay <= 1.0,
            f"box_cross_class_decay must be in [0, 1], got {self.box_cross_class_decay}",
        )
        need(self.mask_num_convs >= 1, "mask_num_convs must be >= 1")
        need(
            self.mask_batch_size_per_image is None or self.mask_batch_size_per_image >= 1,
            f"mask_batch_size_per_image must be None or >= 1, got {self.mask_batch_size_per_image}",
        )

    # -- presets -----------------------------------------------------------------
    @classmethod
    def shapes(cls, **overrides) -> "MaskRCNNConfig":
        """The toy preset: trains from scratch on 128x128 shapes images on a CPU.

        Small GroupNorm ResNet (one BasicBlock per stage, 32..256 channels),
        FPN width 64, anchors 24..384 px for shapes of 25-68 px (square root of
        the box area, median 51, so P3's 48 px anchors fit the typical shape;
        with 16..256 px, 68% of the shapes had no anchor at the RPN's positive
        IoU of 0.7, and 6-minute runs missed more of them: README, "What it
        reaches"), RoI counts sized for a CPU, aligned RoIAlign, mask targets
        and mask paste (detectron2; the aligned paste is worth 0.01-0.02 mask
        AP on these shapes), and torchvision's 4-conv mask head at 64 channels
        instead of 256, predicting 28x28 masks from 14x14 RoI features, trained
        on at most 8 positives per image (the head is half of a CPU step
        otherwise; measured over 10-minute runs: mask AP 0.805 with every
        positive and 64 box samples per image, 0.817 with the cap, 0.832 with
        the cap and 128 box samples; two convolutions instead of four: mask AP
        0.86 instead of 0.90 in 6 minutes, README). After the per-class NMS, a
        detection overlapping one of another class with a higher score keeps
        a fifth of its score (``box_cross_class_decay``: each shape has one
        class, and detections of a second class on one object ranked above
        true objects of that class; +0.0008-0.0018 mask AP50 on 500 images
        outside the training and held-out sets).
        """
        cfg = dict(
            num_classes=4,
            class_names=("background", "square", "circle", "triangle"),
            min_size=None,
            max_size=None,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.25, 0.25, 0.25),
            block="basic",
            blocks_per_stage=(1, 1, 1, 1),
            stem_channels=32,
            stage_channels=(32, 64, 128, 256),
            norm="group",
            group_norm_groups=8,
            frozen_stages=0,
            fpn_channels=64,
            anchor_sizes=(24, 48, 96, 192, 384),
            rpn_pre_nms_top_n_train=600,
            rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_train=300,
            rpn_post_nms_top_n_test=100,
            rpn_batch_size_per_image=128,
            roi_aligned=True,
            roi_sampling_ratio=2,
            canonical_scale=224.0,
            box_batch_size_per_image=128,
            box_representation_size=256,
            mask_num_convs=4,
            mask_channels=64,
            mask_batch_size_per_image=8,
            mask_target_mode="soft",
            mask_target_aligned=True,
            mask_paste_aligned=True,
            box_cross_class_decay=0.2,
            box_detections_per_img=20,
        )
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def torchvision_r50_fpn(cls, **overrides) -> "MaskRCNNConfig":
        """torchvision's maskrcnn_resnet50_fpn (91 COCO classes): the values of docs/semantics.md."""
        cfg = dict(
            num_classes=91,
            class_names=tuple(["background"] + [f"class_{i}" for i in range(1, 91)]),
            min_size=800,
            max_size=1333,
            image_mean=(0.485, 0.456, 0.406),
            image_std=(0.229, 0.224, 0.225),
            block="bottleneck",
            blocks_per_stage=(3, 4, 6, 3),
            stem_channels=64,
            stage_channels=(256, 512, 1024, 2048),
            norm="frozen_bn",
            frozen_stages=2,
            fpn_channels=256,
            anchor_sizes=(32, 64, 128, 256, 512),
            roi_aligned=False,
            roi_sampling_ratio=2,
            mask_num_convs=4,
            mask_channels=256,
            mask_target_mode="soft",
            mask_target_aligned=False,
            blas_threads=0,
        )
        cfg.update(overrides)
        return cls(**cfg)

    # -- derived values ----------------------------------------------------------
    @property
    def anchor_sizes_per_level(self) -> tuple:
        """anchor_sizes as one tuple of sizes per level: ``(32, 64, ...)`` -> ``((32,), (64,), ...)``."""
        return tuple(tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in self.anchor_sizes)

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios) * len(self.anchor_sizes_per_level[0])

    @property
    def bbox_xform_clip(self) -> float:
        return math.log(1000.0 / 16)

    # -- (de)serialisation, used by checkpoints (JSON, never pickle) -------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MaskRCNNConfig":
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("config JSON must be an object")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"config JSON has unknown fields: {', '.join(unknown)}")

        def as_tuple(v):  # JSON arrays back to tuples, nested ones too (anchor_sizes per level)
            return tuple(as_tuple(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: as_tuple(v) for k, v in raw.items()})

    def replace(self, **changes) -> "MaskRCNNConfig":
        return dataclasses.replace(self, **changes)
