"""Checks on what a user passes to the model: images and training targets.

Each check raises one ValueError (or TypeError) that names the image or
target and what is wrong with it, before any stage runs.
"""
from __future__ import annotations

import numpy as np

from ..ops.resize import resized_shape


def check_images(images, config) -> None:
    """Raise ValueError/TypeError naming the first image that is not a (3, H, W) float array in [0, 1]."""
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of (3, H, W) arrays")
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray):
            raise TypeError(f"image {i} must be a numpy array, got {type(img).__name__}")
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i} must have shape (3, H, W), got {img.shape}")
        if not np.issubdtype(img.dtype, np.floating):
            raise ValueError(f"image {i} must be float in [0, 1], got dtype {img.dtype}")
        if not np.isfinite(img).all():
            raise ValueError(f"image {i} contains NaN or inf")
        (h, w), _ = resized_shape(*img.shape[1:], config.min_size, config.max_size)
        if min(h, w) < 32:
            raise ValueError(f"image {i} is {h}x{w} after resizing; the smallest side must be "
                             "at least 32 pixels (the coarsest feature map has stride 32)")

def check_targets(images, targets, config) -> None:
    """Raise ValueError naming the first target dict that does not fit its image."""
    if targets is None or len(targets) != len(images):
        raise ValueError(f"need one target dict per image ({len(images)} images)")
    k = config.num_classes
    for i, (img, t) in enumerate(zip(images, targets)):
        for key in ("boxes", "labels", "masks"):
            if key not in t:
                raise ValueError(f"target {i} has no {key!r}")
        boxes, labels, masks = t["boxes"], np.asarray(t["labels"]), t["masks"]
        n = len(labels)
        if boxes.shape != (n, 4):
            raise ValueError(f"target {i}: boxes must be ({n}, 4) for {n} labels, got {boxes.shape}")
        if masks.shape != (n,) + img.shape[1:]:
            raise ValueError(f"target {i}: masks must be ({n}, {img.shape[1]}, {img.shape[2]}) "
                             f"to match the image, got {masks.shape}")
        if not np.isfinite(boxes).all():
            raise ValueError(f"target {i}: boxes contain NaN or inf")
        if n and (labels.min() < 1 or labels.max() >= k):
            raise ValueError(f"target {i}: labels must be in 1..{k - 1}, got {labels.min()}..{labels.max()}")
        if n and np.any((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])):
            bad = int(np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0])
            raise ValueError(f"target {i}: box {bad} {boxes[bad].tolist()} has zero or negative size")
