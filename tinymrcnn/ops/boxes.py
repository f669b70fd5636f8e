"""Box arithmetic: area, IoU, clipping, small-box removal and the box coder.

Boxes are (x1, y1, x2, y2) in continuous pixel coordinates with
width = x2 - x1 (no +1), as in torchvision (docs/semantics.md#box-coding,
docs/semantics.md#iou). Every function works in the dtype it is given
(float32 or float64) and computes in the same order as torchvision's
``torchvision.ops.boxes`` and ``torchvision.models.detection._utils.BoxCoder``,
so the numbers agree to the last bit wherever NumPy and PyTorch round alike.

None of these needs a backward: the RPN and box-head losses are taken on the
deltas (the coder's *encoded* targets are constants), and decoded boxes only
feed NMS and RoI pooling as coordinates that receive no gradient.
"""

from __future__ import annotations

import math

import numpy as np

from ..checks import check_float_array


def check_boxes(boxes, name: str = "boxes", allow_inverted: bool = False) -> np.ndarray:
    """``boxes`` must be a finite float (N, 4) array with x2 >= x1 and y2 >= y1.

    Zero-width or zero-height boxes are allowed (their IoU with anything is 0);
    inverted boxes (x2 < x1) are rejected unless ``allow_inverted`` because their
    "area" is negative and would make IoU meaningless.
    """
    check_float_array(boxes, name, ndim=2)
    if boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {boxes.shape}")
    if not allow_inverted and boxes.size:
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{name} has {int(bad.sum())} inverted box(es) with x2 < x1 or y2 < y1 "
                f"(first: row {i} = {boxes[i].tolist()})"
            )
    return boxes


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Area of each box: (x2 - x1) * (y2 - y1).  boxes (N, 4) -> (N,)."""
    check_boxes(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union.

    boxes1 (N, 4), boxes2 (M, 4) -> iou (N, M), in the promoted dtype.
    iou[i, j] = inter / (area1[i] + area2[j] - inter), the same order of
    operations as torchvision (and as the NMS kernel, so both agree bit for bit).
    Where the union is 0 (two zero-area boxes) the IoU is 0, not NaN.
    """
    area1 = box_area(check_boxes(boxes1, "boxes1"))  # (N,)
    area2 = box_area(check_boxes(boxes2, "boxes2"))  # (M,)
    lt = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # (N, M, 2)
    wh = np.maximum(rb - lt, 0)  # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area1[:, None] + area2[None, :] - inter  # (N, M)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def clip_boxes_to_image(boxes: np.ndarray, size) -> np.ndarray:
    """Clamp x to [0, width] and y to [0, height].

    boxes (..., 4k) with (x1, y1, x2, y2) repeated k times; size = (height, width).
    Returns a new array of the same shape and dtype.
    """
    check_float_array(boxes, "boxes")
    if boxes.ndim < 1 or boxes.shape[-1] % 4:
        raise ValueError(f"boxes must have a last dimension that is a multiple of 4, got {boxes.shape}")
    height, width = _image_size(size)
    out = np.empty_like(boxes)
    out[..., 0::2] = np.clip(boxes[..., 0::2], 0, width)
    out[..., 1::2] = np.clip(boxes[..., 1::2], 0, height)
    return out


def remove_small_boxes(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """Indices (int64, increasing) of the boxes whose width and height are both >= min_size.

    boxes (N, 4) -> keep (K,). A side strictly below ``min_size`` removes the box.
    """
    check_boxes(boxes, allow_inverted=True)
    ws = boxes[:, 2] - boxes[:, 0]
    hs = boxes[:, 3] - boxes[:, 1]
    return np.flatnonzero((ws >= min_size) & (hs >= min_size)).astype(np.int64)


class BoxCoder:
    """Encode a box relative to a reference box as deltas, and decode it back.

    For a proposal (anchor) P with centre (px, py) and size (pw, ph) and a target
    box G, Faster R-CNN's parametrisation (Girshick et al. 2014, appendix C) is

        dx = wx (gx - px) / pw      dw = ww log(gw / pw)
        dy = wy (gy - py) / ph      dh = wh log(gh / ph)

    with weights (wx, wy, ww, wh): (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for
    the box head (docs/semantics.md#box-coding). ``decode`` clamps dw, dh from above at
    ``bbox_xform_clip`` = log(1000 / 16) so that exp() cannot blow up early in
    training.
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip: float = math.log(1000.0 / 16)):
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 entries (wx, wy, ww, wh), got {weights!r}")
        # Python floats, so that NumPy keeps float32 arrays in float32 (as torch does).
        self.weights = tuple(float(w) for w in weights)
        if not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError(f"weights must be positive and finite, got {weights!r}")
        self.bbox_xform_clip = float(bbox_xform_clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, bbox_xform_clip={self.bbox_xform_clip:.6g})"

    def encode(self, reference_boxes: np.ndarray, proposals: np.ndarray) -> np.ndarray:
        """Deltas that move each proposal onto its reference (ground-truth) box.

        reference_boxes (N, 4), proposals (N, 4) -> deltas (N, 4), row i for pair i.
        Both must have positive width and height (log and division by the size).
        """
        check_boxes(reference_boxes, "reference_boxes")
        check_boxes(proposals, "proposals")
        if reference_boxes.shape != proposals.shape:
            raise ValueError(
                f"reference_boxes {reference_boxes.shape} and proposals {proposals.shape} "
                "must have the same shape (one reference per proposal)"
            )
        for name, b in (("reference_boxes", reference_boxes), ("proposals", proposals)):
            if b.size and ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
                raise ValueError(f"{name} must have positive width and height to be encoded")
        # --- exercise: box_coder ---
        wx, wy, ww, wh = self.weights
        ex_widths = proposals[:, 2] - proposals[:, 0]  # (N,)
        ex_heights = proposals[:, 3] - proposals[:, 1]
        ex_ctr_x = proposals[:, 0] + 0.5 * ex_widths
        ex_ctr_y = proposals[:, 1] + 0.5 * ex_heights

        gt_widths = reference_boxes[:, 2] - reference_boxes[:, 0]
        gt_heights = reference_boxes[:, 3] - reference_boxes[:, 1]
        gt_ctr_x = reference_boxes[:, 0] + 0.5 * gt_widths
        gt_ctr_y = reference_boxes[:, 1] + 0.5 * gt_heights

        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * np.log(gt_widths / ex_widths)
        dh = wh * np.log(gt_heights / ex_heights)
        return np.stack((dx, dy, dw, dh), axis=1)  # (N, 4)
        # --- end exercise ---

    def decode(self, deltas: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Apply deltas to reference boxes.

        deltas (N, 4k) (k boxes per row, e.g. one per class), boxes (N, 4)
        -> decoded boxes (N, 4k) in the dtype of ``deltas`` (as torchvision's
        ``decode_single``; ``boxes`` are cast to it).
        """
        check_float_array(deltas, "deltas", ndim=2)
        if deltas.shape[1] % 4 or deltas.shape[1] == 0:
            raise ValueError(f"deltas must have shape (N, 4k), got {deltas.shape}")
        check_boxes(boxes, "boxes")
        if boxes.shape[0] != deltas.shape[0]:
            raise ValueError(f"deltas {deltas.shape} and boxes {boxes.shape} need the same number of rows")
        boxes = boxes.astype(deltas.dtype, copy=False)
        # --- exercise: box_coder ---
        wx, wy, ww, wh = self.weights
        widths = boxes[:, 2] - boxes[:, 0]  # (N,)
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        dx = deltas[:, 0::4] / wx  # (N, k)
        dy = deltas[:, 1::4] / wy
        dw = np.minimum(deltas[:, 2::4] / ww, self.bbox_xform_clip)
        dh = np.minimum(deltas[:, 3::4] / wh, self.bbox_xform_clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = np.exp(dw) * widths[:, None]
        pred_h = np.exp(dh) * heights[:, None]
        half_w = 0.5 * pred_w
        half_h = 0.5 * pred_h
        out = np.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), axis=2
        )  # (N, k, 4)
        return out.reshape(deltas.shape[0], -1)  # (N, 4k)
        # --- end exercise ---


def _image_size(size) -> tuple[float, float]:
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), got {size!r}") from None
    if not (np.isfinite(height) and np.isfinite(width)) or height < 0 or width < 0:
        raise ValueError(f"size must be two non-negative finite numbers (height, width), got {size!r}")
    return height, width
