"""Non-maximum suppression, plain and batched (docs/semantics.md#nms).

Greedy: sort by score, descending and stable (equal scores keep their input
order); keep the best box; drop every later box whose IoU with it is strictly
greater than ``iou_threshold``; repeat with the next box still standing. The
kept indices come back in decreasing score order, as torchvision's
``torchvision.ops.nms``.

``nms`` and ``batched_nms`` run the Numba kernel in
``tinymrcnn/kernels/cpu/nms.py``; ``nms_reference`` and
``batched_nms_reference`` are the readable NumPy versions with the same
signatures, and the tests assert that they agree exactly.

``decay_across_classes`` is a softer step after per-class NMS: it lowers the
score of a detection that another class has already claimed, instead of
dropping it (docs/semantics.md#box-head).
"""

from __future__ import annotations

import numpy as np

from ..checks import check_float_array
from ..kernels.cpu.nms import nms_sorted_kernel
from .boxes import box_iou, check_boxes


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS.

    boxes (N, 4) float32/float64, scores (N,) float, iou_threshold in [0, 1]
    -> keep (K,) int64 indices into ``boxes``, in decreasing score order.
    """
    n = _check_inputs(boxes, scores)
    return batched_nms(boxes, scores, np.zeros(n, np.int64), iou_threshold)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """NMS run independently for each value of ``idxs`` (e.g. class or pyramid level).

    boxes (N, 4), scores (N,), idxs (N,) integers, iou_threshold in [0, 1]
    -> keep (K,) int64 indices into ``boxes``, in decreasing score order over
    all groups (stable for ties). A box only suppresses boxes with the same idx.
    """
    n = _check_inputs(boxes, scores, idxs)
    thr = _kernel_threshold(_check_threshold(iou_threshold), boxes.dtype)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")  # (N,) best first, ties in input order
    sorted_boxes, sorted_idxs = boxes[order], idxs[order]
    kept = []  # positions in the sorted order
    # one kernel call per group (the loop torchvision calls "vanilla"): the work is sum(n_g^2), not N^2,
    # and no coordinate offsets that could round the IoU differently
    for group in np.unique(sorted_idxs):
        positions = np.flatnonzero(sorted_idxs == group)  # increasing: still best first
        kept.append(positions[nms_sorted_kernel(np.ascontiguousarray(sorted_boxes[positions]), thr)])
    return order[np.sort(np.concatenate(kept))].astype(np.int64, copy=False)


def nms_reference(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Readable greedy NMS in NumPy (same signature and result as ``nms``)."""
    n = _check_inputs(boxes, scores)
    return batched_nms_reference(boxes, scores, np.zeros(n, np.int64), iou_threshold)


def batched_nms_reference(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Readable batched NMS in NumPy (same signature and result as ``batched_nms``).

    Vectorised over the candidates: each kept box computes its IoU with every
    later box at once, using ``box_iou``, so this is also the NumPy baseline in
    benchmarks/bench_nms.py.
    """
    n = _check_inputs(boxes, scores, idxs)
    thr = _check_threshold(iou_threshold)
    order = np.argsort(-scores, kind="stable")
    boxes, groups = boxes[order], idxs[order]
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        iou = box_iou(boxes[i : i + 1], boxes[i + 1 :])[0]  # (n - i - 1,)
        # compare in float64, as torchvision compares a float32 IoU with a double threshold
        suppressed[i + 1 :] |= (iou.astype(np.float64) > thr) & (groups[i + 1 :] == groups[i])
    return order[np.asarray(keep, dtype=np.int64)].astype(np.int64, copy=False)


def decay_across_classes(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float, factor: float
) -> np.ndarray:
    """Scores after a cross-class decay: the per-class NMS leaves one object detected as two classes.

    boxes (N, 4), scores (N,), labels (N,) integers, iou_threshold in [0, 1],
    factor in [0, 1] -> new scores (N,), same dtype. A detection whose box has
    IoU strictly greater than ``iou_threshold`` with a *higher-scoring*
    detection of *another* label gets its score multiplied by ``factor``
    (ties: the earlier in input order counts as higher). The comparison uses
    the original scores, so a decayed detection still decays the ones below
    it. ``factor=1`` changes nothing; ``factor=0`` is class-agnostic NMS on
    top of the per-class one, which also drops the second guess when it is
    the right one (an object half under another of a different class).
    """
    n = _check_inputs(boxes, scores, labels, "labels")
    thr = _check_threshold(iou_threshold)
    factor = float(factor)
    if not 0.0 <= factor <= 1.0:
        raise ValueError(f"factor must be in [0, 1], got {factor!r}")
    rank = np.empty(n, np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(n)  # 0 = best
    higher = rank[None, :] < rank[:, None]  # higher[i, j]: j outranks i
    other_class = labels[None, :] != labels[:, None]
    overlaps = box_iou(boxes, boxes).astype(np.float64) > thr
    claimed = (higher & other_class & overlaps).any(axis=1)  # (N,)
    return np.where(claimed, scores * scores.dtype.type(factor), scores)


def _check_inputs(boxes, scores, idxs=None, idxs_name: str = "idxs") -> int:
    """Validate shapes and values; return N."""
    check_boxes(boxes, "boxes")
    check_float_array(scores, "scores", ndim=1)
    n = boxes.shape[0]
    if scores.shape[0] != n:
        raise ValueError(f"scores {scores.shape} must have one entry per box ({n} boxes)")
    if idxs is not None:
        if not isinstance(idxs, np.ndarray) or idxs.ndim != 1 or idxs.shape[0] != n:
            raise ValueError(
                f"{idxs_name} must be a 1-d array with one entry per box ({n} boxes), "
                f"got {getattr(idxs, 'shape', type(idxs).__name__)}"
            )
        if not np.issubdtype(idxs.dtype, np.integer):
            raise ValueError(f"{idxs_name} must hold integers, got {idxs.dtype}")
    return n


def _kernel_threshold(thr: float, dtype) -> np.floating:
    """``thr`` rounded *down* to ``dtype``: for any IoU v of that dtype, v > result exactly when v > thr.

    (If thr is not representable, no value of the dtype lies between the result and thr.)
    The kernel then compares in the boxes' dtype, and matches the reference's float64 comparison.
    """
    t = np.asarray(thr, dtype=dtype)[()]
    if float(t) > thr:  # float(): NumPy would compare a Python float with t in t's dtype
        t = np.nextafter(t, dtype.type(-np.inf))
    return t


def _check_threshold(iou_threshold) -> float:
    thr = float(iou_threshold)
    if not 0.0 <= thr <= 1.0:  # also rejects NaN
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")
    return thr
