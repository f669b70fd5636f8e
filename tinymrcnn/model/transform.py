"""Input transform and output post-processing (docs/semantics.md#input-transform).

Before the network: normalise each image, optionally resize it (short side
to ``min_size``, long side at most ``max_size``), and zero-pad the batch at
the bottom/right to a common size that is a multiple of 32, so every
pyramid level has an integer size.

After the network: scale the boxes back to the original image and paste
each 28x28 mask probability map into the original image: torchvision's way
(integer box, padding 1) or, with ``mask_paste_aligned``, detectron2's
(bilinear at the exact box); docs/semantics.md#pasting-masks-into-the-image.
"""

from __future__ import annotations

import math

import numpy as np

from ..ops.resize import interpolate_bilinear, resize_nearest, resized_shape


class Transform:
    """Normalise, resize and batch images; undo the resize on the outputs."""

    def __init__(self, config):
        self.mean = np.asarray(config.image_mean, dtype=np.float64)[:, None, None]
        self.std = np.asarray(config.image_std, dtype=np.float64)[:, None, None]
        self.min_size = config.min_size
        self.max_size = config.max_size
        self.size_divisible = config.size_divisible
        self.paste_aligned = config.mask_paste_aligned

    def __call__(self, images, targets=None, dtype=np.float32):
        """images: list of (3, H_i, W_i) in [0, 1]; targets: optional list of dicts.

        Returns batch (N, 3, H, W) zero-padded, the (h_i, w_i) of each image
        after resizing, and the targets resized alike (boxes scaled per axis,
        masks resized nearest).
        """
        sizes, resized, new_targets = [], [], []
        for i, img in enumerate(images):
            h, w = img.shape[-2:]
            (nh, nw), _ = resized_shape(h, w, self.min_size, self.max_size)
            x = (img.astype(np.float64) - self.mean) / self.std
            if (nh, nw) != (h, w):
                x = interpolate_bilinear(x, (nh, nw))
            resized.append(x.astype(dtype))
            sizes.append((nh, nw))
            if targets is not None:
                t = dict(targets[i])
                if (nh, nw) != (h, w):
                    ratio = np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float64)
                    t["boxes"] = (t["boxes"] * ratio).astype(np.float32)
                    t["masks"] = resize_nearest(t["masks"], (nh, nw))
                new_targets.append(t)
        s = self.size_divisible
        H = int(math.ceil(max(h for h, _ in sizes) / s) * s)
        W = int(math.ceil(max(w for _, w in sizes) / s) * s)
        batch = np.zeros((len(images), 3, H, W), dtype=dtype)
        for i, x in enumerate(resized):
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        return batch, sizes, (new_targets if targets is not None else None)

    def postprocess(self, detections, resized_sizes, original_sizes):
        """Boxes back to the original image and masks pasted at its size."""
        out = []
        for det, (rh, rw), (oh, ow) in zip(detections, resized_sizes, original_sizes):
            ratio = np.array([ow / rw, oh / rh, ow / rw, oh / rh], dtype=np.float32)
            boxes = (det["boxes"] * ratio).astype(np.float32)
            masks = paste_masks_in_image(det["mask_probs"], boxes, (oh, ow), aligned=self.paste_aligned)
            out.append({"boxes": boxes, "labels": det["labels"], "scores": det["scores"], "masks": masks})
        return out


def expand_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """Scale (x1, y1, x2, y2) boxes about their centres by ``scale``."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return np.stack([cx - w_half, cy - h_half, cx + w_half, cy + h_half], axis=1)


def paste_masks_in_image(
    masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], padding: int = 1, aligned: bool = False
) -> np.ndarray:
    """Paste (D, M, M) mask probabilities into (D, H, W) canvases (see docs/semantics.md).

    The M x M map covers the box (x1, y1, x2, y2), in the image's continuous
    coordinates (pixel x spans [x, x + 1)).

    aligned=False (torchvision): the map is padded by ``padding`` zero pixels
    on each side and the box enlarged by (M + 2 padding) / M to match, so the
    mask can fall off smoothly to 0 at the box edge instead of being cut
    there. The enlarged box is cast to integer pixels, the padded mask resized
    bilinearly to it, and the part inside the image copied. The cast moves
    the mask by up to a pixel, which on a 20-pixel object costs IoU.

    aligned=True (detectron2): every pixel reads the map bilinearly at its
    own centre, at the exact box: ``_aligned_paste``.
    """
    H, W = image_size
    d = len(masks)
    out = np.zeros((d, H, W), dtype=np.float32)
    if d == 0:
        return out
    if aligned:
        for i in range(d):
            _aligned_paste(masks[i], boxes[i], out[i])
        return out
    m = masks.shape[-1]
    scale = (m + 2 * padding) / m
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    boxes_i = expand_boxes(boxes.astype(np.float32), scale).astype(np.int64)  # truncation, as torch
    for i in range(d):
        x1, y1, x2, y2 = boxes_i[i]
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        resized = interpolate_bilinear(padded[i].astype(np.float32), (h, w))
        xa, xb = max(x1, 0), min(x2 + 1, W)
        ya, yb = max(y1, 0), min(y2 + 1, H)
        if xb > xa and yb > ya:
            out[i, ya:yb, xa:xb] = resized[ya - y1 : yb - y1, xa - x1 : xb - x1]
    return out


def _aligned_paste(mask: np.ndarray, box: np.ndarray, out: np.ndarray) -> None:
    """out (H, W) <- the (M, M) map ``mask`` resampled at every pixel centre of ``box``.

    Cell k of the map is centred at x1 + (k + 1/2) (x2 - x1) / M, and pixel
    x at x + 1/2, so pixel x reads the map at the cell coordinate

        u(x) = (x + 1/2 - x1) / (x2 - x1) * M - 1/2

    -- the inverse of the aligned RoIAlign that cut the mask targets. Bilinear
    interpolation with zeros outside the map is separable: along x, cell k
    weighs hat(u(x) - k) = max(0, 1 - |u(x) - k|), and likewise along y, so
    the pasted mask is Ry (H, M) @ mask @ Rx (W, M)^T. It fades to 0 within
    half a cell outside the box; only the rows and columns with a nonzero
    weight are multiplied. A box of zero width or height pastes nothing.
    """
    M = mask.shape[0]
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        return
    ry, ya, yb = _hat_weights(out.shape[0], y1, y2, M)
    rx, xa, xb = _hat_weights(out.shape[1], x1, x2, M)
    if yb > ya and xb > xa:
        out[ya:yb, xa:xb] = ry @ mask.astype(np.float64) @ rx.T


def _hat_weights(n: int, lo: float, hi: float, M: int):
    """Bilinear weights of the M cells at pixel centres 0.5 .. n - 0.5, for a box side [lo, hi].

    Returns (weights (b - a, M), a, b): pixels a .. b - 1 are those with a nonzero weight.
    """
    u = (np.arange(n) + 0.5 - lo) / (hi - lo) * M - 0.5
    r = np.maximum(0.0, 1.0 - np.abs(u[:, None] - np.arange(M)[None, :]))
    hit = np.flatnonzero(r.any(axis=1))
    if len(hit) == 0:
        return r[:0], 0, 0
    return r[hit[0] : hit[-1] + 1], int(hit[0]), int(hit[-1]) + 1
