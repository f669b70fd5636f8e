"""COCO-style evaluation: box and mask AP, written from scratch.

This is pycocotools' ``COCOeval`` (evaluate -> accumulate -> summarize)
retold for one reader, and it gives the same numbers (tests check 1e-6).

1. **IoU** per image and category, between the detections (sorted by score,
   at most ``max_dets`` per image *and category*, as COCOeval) and the ground truth: box IoU, or mask IoU on the
   pixel grids. A *crowd* region (``iscrowd=1``) is measured by
   intersection / detection area instead, because a detection on part of a
   crowd should not be called wrong.
2. **Matching** (for each IoU threshold t in 0.50:0.05:0.95 and each area
   range): detections in decreasing score order each take the best still
   unmatched ground truth with IoU >= t (a crowd region can be taken any
   number of times). Ground truth that is a crowd or outside the area range
   is "ignored": matching it makes the detection neither a true nor a false
   positive, and a detection prefers a regular match to an ignored one. An
   unmatched detection outside the area range is ignored too.
3. **Precision-recall**: all detections of a category over all images,
   sorted by score (ties: by image id, then by the order within the image,
   as COCOeval; never by the dataset's order); running counts of true and false positives give
   recall = TP / #GT and precision = TP / (TP + FP). Precision is made
   non-increasing (its "monotone envelope": at each recall the best
   precision at that or any higher recall), then read at the 101 recall
   levels 0, 0.01, ..., 1 (0 past the highest recall reached).
4. **AP** = mean of those 101 precisions over thresholds and categories;
   AP50 and AP75 at one threshold; APs/APm/APl for ground truth areas in
   [0, 32^2], [32^2, 96^2], [96^2, inf). A category with no (non-ignored)
   ground truth has no AP and is left out of the mean; an AP with nothing
   to average is -1, as in COCO.

What "area" means, as in COCO: for ground truth the annotation's ``area``
(``target["area"]``; ShapesDataset and CocoDataset give it; if absent the
mask's pixel count); for a detection its box's w * h ("bbox") or its
thresholded mask's pixel count ("segm").
"""

from __future__ import annotations

import warnings

import numpy as np

# The exact values pycocotools uses (np.linspace rounding included).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)  # (T,) = 10
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1)  # (R,) = 101
T50, T75 = (int(np.argmin(np.abs(IOU_THRESHOLDS - t))) for t in (0.5, 0.75))  # AP50's and AP75's rows
AREA_RANGES = {"all": (0.0, 1e10), "small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, 1e10)}


def coco_evaluate(
    predictions, dataset, iou_type: str = "segm", max_dets: int = 100, mask_threshold: float = 0.5
) -> dict:
    """COCO AP of ``predictions`` against ``dataset``'s ground truth.

    predictions: one dict per dataset image, in dataset order: boxes (N, 4)
        x1 y1 x2 y2, labels (N,) in 1..K, scores (N,), and for "segm" masks
        (N, H, W) probabilities (a pixel is in the mask when > mask_threshold)
        or binary masks.
    dataset: ``dataset[i] -> (image, target)`` with boxes, labels, masks and
        optionally iscrowd, area and image_id (score ties between images are
        broken by image id, as pycocotools; default: the index); ``dataset.class_names`` names the K
        categories (else K = the largest label seen).

    Returns a dict: AP, AP50, AP75, APs, APm, APl, AR (recall averaged over
    thresholds and categories, max_dets per image) as floats in [0, 1] or -1;
    per_class {name: AP}; precision (T, R, K, 4) and recall (T, K, 4) arrays
    (-1 where undefined; last axis: all, small, medium, large);
    iou_thresholds (T,), recall_thresholds (R,), class_names, iou_type.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset)} dataset images")
    class_names = _class_names(dataset)
    num_classes = len(class_names)

    per_cell, num_gt, image_ids = _match_dataset(predictions, dataset, iou_type, max_dets, mask_threshold, num_classes)
    rank = _image_id_rank(image_ids)

    T, R, A = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES)
    precision = -np.ones((T, R, num_classes, A))
    recall = -np.ones((T, num_classes, A))
    for k in range(num_classes):
        for a in range(A):
            if per_cell[k][a]:
                images = [e for _, e in sorted(per_cell[k][a], key=lambda ie: rank[ie[0]])]
                precision[:, :, k, a], recall[:, k, a] = precision_recall(images)

    def mean_valid(x):
        x = x[x > -1]
        return float(np.mean(x)) if x.size else -1.0

    if num_gt == 0:
        warnings.warn(
            f"no ground truth: the {len(dataset)} image(s) hold no (non-crowd) object of the "
            f"{num_classes} categories, so every AP is undefined (-1); check the annotation "
            "file's category ids and image ids",
            stacklevel=2,
        )
    return {
        "AP": mean_valid(precision[..., 0]),
        "AP50": mean_valid(precision[T50, ..., 0]),
        "AP75": mean_valid(precision[T75, ..., 0]),
        "APs": mean_valid(precision[..., 1]),
        "APm": mean_valid(precision[..., 2]),
        "APl": mean_valid(precision[..., 3]),
        "AR": mean_valid(recall[..., 0]),
        "per_class": {name: mean_valid(precision[:, :, k, 0]) for k, name in enumerate(class_names)},
        "precision": precision,
        "recall": recall,
        "iou_thresholds": IOU_THRESHOLDS.copy(),
        "recall_thresholds": RECALL_THRESHOLDS.copy(),
        "area_ranges": tuple(AREA_RANGES),
        "class_names": tuple(class_names),
        "iou_type": iou_type,
        "max_dets": max_dets,
    }


# ------------------------------------------------------------ inputs


def _class_names(dataset) -> tuple:
    """``dataset.class_names``, else "1".."K" with K the largest label in the dataset."""
    class_names = getattr(dataset, "class_names", None)
    if class_names is None:
        top = max((int(max(_target(dataset, i)["labels"], default=0)) for i in range(len(dataset))), default=0)
        class_names = tuple(str(k) for k in range(1, top + 1))
    return tuple(class_names)


def _match_dataset(predictions, dataset, iou_type: str, max_dets: int, mask_threshold: float, num_classes: int):
    """Steps 1 and 2 for every image: per_cell[k][a] = [(image index, match_image result), ...].

    Also returns the number of ground truths that count and each image's id.
    """
    areas = list(AREA_RANGES.values())
    per_cell = [[[] for _ in areas] for _ in range(num_classes)]
    num_gt = 0
    image_ids = []
    for i, pred in enumerate(predictions):
        target = _target(dataset, i)
        image_ids.append(target.get("image_id", i))
        dt = _detections(pred, iou_type, mask_threshold, target["masks"].shape[-2:], i, num_classes)
        gt = _ground_truth(target, iou_type)
        num_gt += int(np.count_nonzero(~gt["iscrowd"] & (gt["labels"] >= 1) & (gt["labels"] <= num_classes)))
        for k in range(num_classes):
            d = np.flatnonzero(dt["labels"] == k + 1)
            g = np.flatnonzero(gt["labels"] == k + 1)
            if len(d) == 0 and len(g) == 0:
                continue
            d = d[np.argsort(-dt["scores"][d], kind="mergesort")][:max_dets]  # by score, stable
            ious = _iou(dt["geometry"][d], gt["geometry"][g], gt["iscrowd"][g], iou_type)  # (D, G)
            for a, area_range in enumerate(areas):
                per_cell[k][a].append(
                    (i, match_image(ious, dt["scores"][d], dt["area"][d], gt["area"][g], gt["iscrowd"][g], area_range))
                )
    return per_cell, num_gt, image_ids


def _image_id_rank(image_ids: list) -> np.ndarray:
    """rank[i] = position of image i when the images are sorted by id (stable), COCOeval's pooling order.

    Score ties between images are then broken by image id, as pycocotools
    does, whatever order the dataset lists its images in; ids that cannot be
    compared with each other keep the dataset order.
    """
    n = len(image_ids)
    try:
        order = sorted(range(n), key=lambda i: image_ids[i])
    except TypeError:
        order = list(range(n))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def _target(dataset, i: int) -> dict:
    """Ground truth of image i (skips reading the image when the dataset can)."""
    if hasattr(dataset, "get_target"):
        return dataset.get_target(i)
    return dataset[i][1]


def _ground_truth(target: dict, iou_type: str) -> dict:
    masks = np.asarray(target["masks"])
    n = len(target["labels"])
    area = target.get("area")
    return {
        "labels": np.asarray(target["labels"]).astype(np.int64),
        "iscrowd": np.asarray(target.get("iscrowd", np.zeros(n)), dtype=bool),
        "area": (
            np.asarray(area, dtype=np.float64) if area is not None else masks.sum(axis=(-2, -1)).astype(np.float64)
        ),
        "geometry": (
            _boxes_xywh(target["boxes"])
            if iou_type == "bbox"
            else masks.reshape(n, masks.shape[-2] * masks.shape[-1]) != 0
        ),
    }


def _detections(pred: dict, iou_type: str, mask_threshold: float, image_size, i: int, num_classes: int) -> dict:
    for key in ("boxes", "labels", "scores") + (("masks",) if iou_type == "segm" else ()):
        if key not in pred:
            raise ValueError(f"predictions[{i}] has no {key!r}")
    labels = np.asarray(pred["labels"]).astype(np.int64)
    n = len(labels)
    scores = np.asarray(pred["scores"], dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"predictions[{i}]: {n} labels but scores of shape {scores.shape}")
    if n and (labels.min() < 1 or labels.max() > num_classes):
        raise ValueError(f"predictions[{i}]: labels must be in 1..{num_classes}, got {labels.min()}..{labels.max()}")
    if iou_type == "bbox":
        boxes = _boxes_xywh(pred["boxes"])
        if len(boxes) != n:
            raise ValueError(f"predictions[{i}]: {n} labels but {len(boxes)} boxes")
        return {"labels": labels, "scores": scores, "geometry": boxes, "area": boxes[:, 2] * boxes[:, 3]}
    masks = np.asarray(pred["masks"])
    if masks.shape != (n, *image_size):
        raise ValueError(
            f"predictions[{i}]: masks must have shape {(n, *image_size)} "
            f"(N, H, W at the image's size), got {masks.shape}"
        )
    masks = masks.reshape(n, masks.shape[1] * masks.shape[2]) > mask_threshold  # (N, H*W) bool
    return {"labels": labels, "scores": scores, "geometry": masks, "area": masks.sum(axis=1).astype(np.float64)}


def _boxes_xywh(boxes) -> np.ndarray:
    """x1 y1 x2 y2 -> COCO's x y w h (float64), the form pycocotools computes IoU in."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


# ------------------------------------------------------------ step 1: IoU


def _iou(dt, gt, gt_crowd: np.ndarray, iou_type: str) -> np.ndarray:
    """(D, G) IoU; for a crowd ground truth, intersection / detection area."""
    if iou_type == "bbox":
        return box_iou_xywh(dt, gt, gt_crowd)
    return mask_iou(dt, gt, gt_crowd)


def box_iou_xywh(dt: np.ndarray, gt: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """(D, 4) and (G, 4) boxes as x y w h -> (D, G) IoU (crowd columns: inter / det area)."""
    dx, dy, dw, dh = (dt[:, j : j + 1] for j in range(4))  # (D, 1) each
    gx, gy, gw, gh = (gt[None, :, j] for j in range(4))  # (1, G) each
    iw = np.minimum(dx + dw, gx + gw) - np.maximum(dx, gx)  # (D, G)
    ih = np.minimum(dy + dh, gy + gh) - np.maximum(dy, gy)
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    return _ratio(inter, dw * dh, gw * gh, gt_crowd)


def mask_iou(dt: np.ndarray, gt: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """(D, P) and (G, P) flattened bool masks -> (D, G) IoU (crowd columns: inter / det area)."""
    # float32 counts are exact up to 2^24 pixels (a 4096 x 4096 image), float64 beyond
    ftype = np.float32 if dt.shape[1] < 2**24 else np.float64
    inter = (dt.astype(ftype) @ gt.astype(ftype).T).astype(np.float64)  # (D, G) pixel counts
    return _ratio(
        inter, dt.sum(axis=1)[:, None].astype(np.float64), gt.sum(axis=1)[None, :].astype(np.float64), gt_crowd
    )


def _ratio(inter, dt_area, gt_area, gt_crowd) -> np.ndarray:
    union = np.where(gt_crowd[None, :], dt_area, dt_area + gt_area - inter)
    out = np.zeros(np.broadcast_shapes(inter.shape, union.shape))
    np.divide(inter, union, out=out, where=inter > 0)  # no overlap -> 0
    return out


# ------------------------------------------------------------ step 2: matching


def match_image(
    ious: np.ndarray, dt_scores: np.ndarray, dt_area: np.ndarray, gt_area: np.ndarray, gt_crowd: np.ndarray, area_range
) -> dict:
    """Greedy matching of one image and category for every IoU threshold (COCOeval.evaluateImg).

    ious (D, G) with detections already sorted by decreasing score.
    Returns scores (D,), tp and fp (T, D) bool, and n_gt = the number of
    ground truths that count (neither crowd nor outside the area range).
    """
    lo, hi = area_range
    gt_ignore = gt_crowd | (gt_area < lo) | (gt_area > hi)
    order = np.argsort(gt_ignore, kind="mergesort")  # regular ground truth first
    ious, gt_ignore, gt_crowd = ious[:, order], gt_ignore[order], gt_crowd[order]
    num_dt, num_gt = ious.shape

    matched_gt = -np.ones((len(IOU_THRESHOLDS), num_dt), dtype=np.int64)  # (T, D) index into sorted gt
    for t, threshold in enumerate(IOU_THRESHOLDS):
        threshold = min(threshold, 1 - 1e-10)
        gt_taken = np.zeros(num_gt, dtype=bool)
        candidates = np.flatnonzero(ious.max(axis=1) >= threshold) if num_gt else []
        for d in candidates:  # in score order
            best_iou, best = threshold, -1
            for g in range(num_gt):
                if gt_taken[g] and not gt_crowd[g]:
                    continue  # taken (crowds never are)
                if best > -1 and not gt_ignore[best] and gt_ignore[g]:
                    break  # keep a regular match over ignored ones
                if ious[d, g] < best_iou:
                    continue
                best_iou, best = ious[d, g], g  # ties: the later one, as COCOeval
            if best > -1:
                matched_gt[t, d] = best
                gt_taken[best] = True

    matched = matched_gt > -1
    dt_ignore = np.zeros_like(matched)
    dt_ignore[matched] = gt_ignore[matched_gt[matched]]  # matched an ignored gt
    outside = (dt_area < lo) | (dt_area > hi)
    dt_ignore |= ~matched & outside[None, :]
    return {
        "scores": dt_scores,
        "tp": matched & ~dt_ignore,
        "fp": ~matched & ~dt_ignore,
        "n_gt": int(np.count_nonzero(~gt_ignore)),
    }


# ------------------------------------------------------------ step 3: precision and recall


def precision_recall(images: list) -> tuple[np.ndarray, np.ndarray]:
    """Pool one category's matched images -> precision (T, R) at the recall levels and recall (T,).

    Both are -1 when the category has no ground truth that counts.
    """
    T, R = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    n_gt = sum(e["n_gt"] for e in images)
    if n_gt == 0:
        return -np.ones((T, R)), -np.ones(T)
    scores = np.concatenate([e["scores"] for e in images])
    order = np.argsort(-scores, kind="mergesort")  # ties keep the order of the images (by id) and within each image
    tp = np.cumsum(np.concatenate([e["tp"] for e in images], axis=1)[:, order], axis=1).astype(np.float64)
    fp = np.cumsum(np.concatenate([e["fp"] for e in images], axis=1)[:, order], axis=1).astype(np.float64)

    precision = np.zeros((T, R))
    recall = np.zeros(T)
    for t in range(T):
        rc = tp[t] / n_gt  # (D,)
        pr = tp[t] / (tp[t] + fp[t] + np.spacing(1))
        if len(rc):
            recall[t] = rc[-1]
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # monotone envelope
        idx = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")  # first point reaching each level
        reached = idx < len(pr)
        precision[t, reached] = pr[idx[reached]]
    return precision, recall


# ------------------------------------------------------------ how much of an AP is the choice of images


def bootstrap_ap(
    predictions_by_run: dict,
    dataset,
    num_samples: int = 1000,
    seed: int = 0,
    iou_type: str = "segm",
    max_dets: int = 100,
    mask_threshold: float = 0.5,
) -> dict:
    """COCO AP of several runs on ``num_samples`` bootstrap resamples of ``dataset``'s images.

    predictions_by_run: {run name: predictions as for :func:`coco_evaluate`},
    every run on the same dataset. Each resample draws len(dataset) images
    with replacement (an image drawn twice counts twice: its ground truth and
    its detections); every run is scored on the *same* resamples, so the
    difference between two runs' arrays is a paired bootstrap of their gap.

    The resamples depend only on ``seed`` and ``len(dataset)``, so separate
    calls with the same seed and dataset are paired as well.

    Returns {run name: {"AP", "AP50", "AP75": (num_samples,) arrays}}. The
    spread of a run's array is how much its AP depends on which images
    happen to be held out; a gap between runs is larger than that noise when
    its 2.5..97.5 percentile interval excludes 0.
    """
    if len(dataset) == 0 or num_samples < 1:
        raise ValueError(
            f"bootstrap_ap needs at least one image and one sample, got {len(dataset)} image(s), "
            f"num_samples={num_samples}"
        )
    class_names = _class_names(dataset)
    rank = None
    cells = {}
    for name, predictions in predictions_by_run.items():
        if len(predictions) != len(dataset):
            raise ValueError(f"run {name!r}: {len(predictions)} predictions for {len(dataset)} dataset images")
        per_cell, _, image_ids = _match_dataset(
            predictions, dataset, iou_type, max_dets, mask_threshold, len(class_names)
        )
        rank = _image_id_rank(image_ids)
        cells[name] = [dict(per_cell[k][0]) for k in range(len(class_names))]  # area "all": {image: match}
    samples = np.random.default_rng(seed).integers(0, len(dataset), size=(num_samples, len(dataset)))
    out = {name: {key: np.empty(num_samples) for key in ("AP", "AP50", "AP75")} for name in predictions_by_run}
    for s, sample in enumerate(samples):
        sample = sample[np.argsort(rank[sample], kind="mergesort")]  # pooled in image-id order, as coco_evaluate
        for name, per_class in cells.items():
            precision = np.stack(
                [precision_recall([by_image[i] for i in sample if i in by_image])[0] for by_image in per_class], -1
            )  # (T, R, K)
            for key, p in (("AP", precision), ("AP50", precision[T50]), ("AP75", precision[T75])):
                valid = p[p > -1]
                out[name][key][s] = float(np.mean(valid)) if valid.size else -1.0
    return out
