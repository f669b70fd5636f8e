"""Augmentation and resizing of (image, target) pairs, before the model sees them.

Every transform is a callable ``t(image, target, rng=None) -> (image, target)``
with image (3, H, W) float and target a dict with boxes (N, 4) x1 y1 x2 y2,
masks (N, H, W) and any other keys (copied through). Random ones draw from
the ``numpy.random.Generator`` they are given, so a training loop that seeds
one generator per step gets the same augmentation on a resumed run;
``rng=None`` means a fresh, unseeded generator.

The resize is the model's own (docs/semantics.md#input-transform, in
:mod:`tinymrcnn.model.transform`): bilinear with half-pixel centres
(PyTorch's ``align_corners=False``), output ``floor(side * scale)``, boxes
multiplied by the per-axis ratio new / old, masks resized nearest. Use it
here to train at another scale than the images are stored at.
"""

from __future__ import annotations

import numpy as np

from ..ops.resize import interpolate_bilinear, resize_nearest, resized_shape


def hflip(image: np.ndarray, target: dict) -> tuple[np.ndarray, dict]:
    """Mirror left-right: column c goes to W - 1 - c, a box [x1, x2] to [W - x2, W - x1]."""
    w = image.shape[-1]
    out = dict(target)
    boxes = np.asarray(target["boxes"])
    out["boxes"] = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1).astype(boxes.dtype)
    out["masks"] = np.ascontiguousarray(target["masks"][..., ::-1])
    return np.ascontiguousarray(image[..., ::-1]), out


def random_horizontal_flip(image, target, rng=None, p: float = 0.5):
    """:func:`hflip` with probability ``p`` (one draw from ``rng`` per call)."""
    rng = np.random.default_rng() if rng is None else rng
    if rng.random() < p:
        return hflip(image, target)
    return image, target


def resize(image: np.ndarray, target: dict, size: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """Resize to ``size = (h, w)``: image bilinear, masks nearest, boxes (and area) scaled."""
    h, w = image.shape[-2:]
    nh, nw = int(size[0]), int(size[1])
    if (nh, nw) == (h, w):
        return image, target
    rx, ry = nw / w, nh / h
    out = dict(target)
    boxes = np.asarray(target["boxes"])
    out["boxes"] = (boxes * np.array([rx, ry, rx, ry])).astype(boxes.dtype)
    out["masks"] = resize_nearest(np.asarray(target["masks"]), (nh, nw))
    if "area" in target:  # COCO's annotation area, in pixels of the new size
        out["area"] = (np.asarray(target["area"]) * (rx * ry)).astype(np.float32)
    return interpolate_bilinear(image, (nh, nw)), out


class RandomHorizontalFlip:
    """Flip with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, target, rng=None):
        return random_horizontal_flip(image, target, rng, self.p)


class Resize:
    """Scale so the short side is ``min_size`` unless the long side would exceed ``max_size``.

    scale = min(min_size / short_side, max_size / long_side); the output is
    floor(side * scale) (torchvision's GeneralizedRCNNTransform).
    """

    def __init__(self, min_size: int, max_size: int | None = None):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target, rng=None):
        size, _ = resized_shape(*image.shape[-2:], self.min_size, self.max_size)
        return resize(image, target, size)


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng=None):
        rng = np.random.default_rng() if rng is None else rng
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def __repr__(self):
        return "Compose([" + ", ".join(type(t).__name__ for t in self.transforms) + "])"
