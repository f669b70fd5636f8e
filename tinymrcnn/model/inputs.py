"""Checks on what a user passes to the model: images and training targets.

Each check raises one ValueError (or TypeError) that names the image or
target and what is wrong with it, before any stage runs.

Checked, because each would otherwise train or predict silently on garbage:
images must be float in [0, 1] (a float image in 0..255 is refused, not
divided); boxes must overlap their image (a box partly outside is used as
given, not clipped); labels must be whole numbers; masks must hold only 0
and 1 (or be boolean).
"""

from __future__ import annotations

import numpy as np

from ..ops.resize import resized_shape

IMAGE_TOLERANCE = 1e-3  # interpolation may overshoot [0, 1] by rounding


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
        lo, hi = (float(img.min()), float(img.max())) if img.size else (0.0, 0.0)
        if lo < -IMAGE_TOLERANCE or hi > 1.0 + IMAGE_TOLERANCE:
            hint = " (it looks like 0..255: divide by 255)" if hi > 2.0 else ""
            raise ValueError(f"image {i} has values in [{lo:g}, {hi:g}]; images must be float in [0, 1]{hint}")
        (h, w), _ = resized_shape(*img.shape[1:], config.min_size, config.max_size)
        if min(h, w) < 32:
            raise ValueError(
                f"image {i} is {h}x{w} after resizing; the smallest side must be "
                "at least 32 pixels (the coarsest feature map has stride 32)"
            )


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
            raise ValueError(
                f"target {i}: masks must be ({n}, {img.shape[1]}, {img.shape[2]}) to match the image, got {masks.shape}"
            )
        if not np.isfinite(boxes).all():
            raise ValueError(f"target {i}: boxes contain NaN or inf")
        if (
            n
            and not np.issubdtype(labels.dtype, np.integer)
            and not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))
        ):
            raise ValueError(f"target {i}: labels must be whole numbers (class indices), got {labels.tolist()}")
        if n and (labels.min() < 1 or labels.max() >= k):
            raise ValueError(f"target {i}: labels must be in 1..{k - 1}, got {labels.min()}..{labels.max()}")
        if n and np.any((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])):
            bad = int(np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))[0])
            raise ValueError(f"target {i}: box {bad} {boxes[bad].tolist()} has zero or negative size")
        h, w = img.shape[1:]
        outside = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= w) | (boxes[:, 1] >= h)
        if n and outside.any():
            bad = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"target {i}: box {bad} {boxes[bad].tolist()} lies entirely outside the "
                f"{w}x{h} image (boxes are x1, y1, x2, y2 in pixels)"
            )
        if n and masks.dtype != np.bool_:
            m = np.asarray(masks)
            if not np.all((m == 0) | (m == 1)):
                vals = np.unique(m)
                shown = ", ".join(f"{v:g}" for v in vals[:6]) + (", ..." if len(vals) > 6 else "")
                raise ValueError(
                    f"target {i}: masks must hold only 0 and 1, got values {shown}"
                    " (threshold soft masks, or divide 0/255 masks by 255)"
                )
