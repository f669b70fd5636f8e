"""Anchors: the reference boxes the RPN scores and regresses, one set per pyramid level.

docs/semantics.md#anchors (torchvision's ``AnchorGenerator``): level l has sizes
``sizes[l]`` and aspect ratios ``aspect_ratios[l]`` (ratio = h / w). For each
(ratio r, size s) the base anchor, centred on the origin, is

    h = s * sqrt(r),  w = s / sqrt(r),  base = round([-w, -h, w, h] / 2)

computed in float32 and rounded half to even, as torchvision does. The base
anchors are copied to every cell of the level's grid, shifted by
``(x, y) = (j * stride_w, i * stride_h)`` with stride = padded_image_size //
grid_size. torchvision puts no half-stride offset there (anchor centres sit on
cell corners); ``cell_centered=True`` adds stride / 2 (detectron2's offset 0.5).

Flatten order is (H, W, A): anchor index = (i * W + j) * A + a, which is the
order the RPN head's outputs must be flattened in (torchvision's
``permute_and_flatten``: (N, A*C, H, W) -> (N, H, W, A, C) -> (N, H*W*A, C)).
"""

from __future__ import annotations

import numpy as np

from ..checks import pair


class AnchorGenerator:
    """Anchors for every level of a feature pyramid.

    sizes: one tuple of sizes per level (pixels of the padded input image).
    aspect_ratios: one tuple of ratios h / w per level.
    cell_centered: put anchor centres at cell centres (+stride/2) instead of
    torchvision's cell corners.

    ``cell_anchors[l]`` is the (A_l, 4) float32 array of base anchors of level l,
    ordered ratio-major: a = ratio_index * len(sizes[l]) + size_index.
    """

    def __init__(
        self,
        sizes=((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios=((0.5, 1.0, 2.0),) * 5,
        cell_centered: bool = False,
    ):
        sizes = tuple(tuple(s) for s in sizes)
        aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"sizes ({len(sizes)} levels) and aspect_ratios ({len(aspect_ratios)} levels) "
                "must have one entry per pyramid level"
            )
        for s, r in zip(sizes, aspect_ratios):
            if not s or not r or min(s) <= 0 or min(r) <= 0:
                raise ValueError(f"every level needs positive sizes and aspect ratios, got {s} and {r}")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_centered = bool(cell_centered)
        self.cell_anchors = [self.base_anchors(s, r) for s, r in zip(sizes, aspect_ratios)]

    def __repr__(self) -> str:
        return (
            f"AnchorGenerator(sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, "
            f"cell_centered={self.cell_centered})"
        )

    @staticmethod
    def base_anchors(sizes, aspect_ratios) -> np.ndarray:
        """Anchors centred on (0, 0): (len(aspect_ratios) * len(sizes), 4) float32."""
        scales = np.asarray(sizes, dtype=np.float32)  # (S,)
        ratios = np.asarray(aspect_ratios, dtype=np.float32)  # (R,)
        h_ratios = np.sqrt(ratios)
        w_ratios = np.float32(1) / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # (R*S,)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)  # (R*S, 4)
        return np.round(base)  # half to even, as torch.round

    def num_anchors_per_location(self) -> list[int]:
        """A for each level: the number of objectness channels the RPN head predicts there."""
        return [len(a) for a in self.cell_anchors]

    def strides(self, image_size, feature_shapes) -> list[tuple[int, int]]:
        """(stride_h, stride_w) per level: padded image size // grid size."""
        H, W = pair(image_size, "image_size")
        if len(feature_shapes) != len(self.cell_anchors):
            raise ValueError(f"got {len(feature_shapes)} feature maps for {len(self.cell_anchors)} anchor levels")
        out = []
        for level, shape in enumerate(feature_shapes):
            h, w = pair(shape, f"feature_shapes[{level}]")
            if h <= 0 or w <= 0:
                raise ValueError(
                    f"feature map of level {level} is empty ({h}x{w}): the image {H}x{W} is "
                    "smaller than the level's stride; pad the batch (to a multiple of 32)"
                )
            if h > H or w > W:
                raise ValueError(f"feature map of level {level} ({h}x{w}) is larger than the image {H}x{W}")
            out.append((H // h, W // w))
        return out

    def anchors_per_level(self, image_size, feature_shapes, dtype=np.float32) -> list[np.ndarray]:
        """Anchors of every level in (H, W, A) order.

        image_size: (H, W) of the padded batch; feature_shapes: [(h, w), ...] one per level
        -> list of (h * w * A, 4) arrays (float32 by default), in image pixels.
        """
        out = []
        strides = self.strides(image_size, feature_shapes)
        for base, (h, w), (sh, sw) in zip(self.cell_anchors, feature_shapes, strides):
            offset = 0.5 if self.cell_centered else 0.0
            shifts_x = (np.arange(w) + offset) * sw  # (w,)
            shifts_y = (np.arange(h) + offset) * sh  # (h,)
            shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")  # (h, w)
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)  # (h*w, 4)
            anchors = shifts[:, None, :].astype(np.float32) + base[None, :, :]  # (h*w, A, 4)
            out.append(anchors.reshape(-1, 4).astype(dtype, copy=False))
        return out

    def __call__(self, image_size, feature_shapes, dtype=np.float32) -> list[np.ndarray]:
        return self.anchors_per_level(image_size, feature_shapes, dtype)
