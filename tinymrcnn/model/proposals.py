"""The RPN's two box layers: the proposal layer and the anchor target layer.

``generate_proposals`` turns the RPN head's outputs into proposals
(docs/walkthrough.md#4-proposal-layer, docs/semantics.md#proposal-layer), per image:

1. per level, keep the ``pre_nms_top_n`` anchors with the highest objectness logits;
2. decode their deltas against the anchors and clip the boxes to the image;
3. remove boxes with a side < ``min_size``;
4. keep boxes whose objectness probability (sigmoid) is >= ``score_thresh``;
5. NMS at ``nms_thresh`` separately on each level (``batched_nms`` with level ids);
6. keep the ``post_nms_top_n`` highest-scoring boxes over all levels.

torchvision's numbers: pre/post 2000/2000 in training, 1000/1000 in testing.
Nothing here needs a backward: proposals are constants for the RoI heads,
exactly as torchvision detaches them.

With ``trace=True`` every step is recorded, one dict per image:

- ``records[i][stage]`` for stage in PROPOSAL_STAGES: a dict of arrays, one row
  per surviving candidate: ``rows`` (indices into the "topk" candidates),
  ``boxes``, ``scores``, ``levels``, ``anchor_index`` (into the concatenation
  of all levels' anchors). "topk" also has ``logits`` and ``deltas``, and its
  ``boxes`` are the anchors; "decoded" holds the boxes before clipping. Rows
  keep the top-k order (level by level, best first) up to "score_thresh";
  from "nms" on they are in decreasing score order.
- ``records[i]["counts"]``: {stage: number of rows}; ``records[i]["num_anchors_per_level"]``.

``assign_rpn_targets`` is the anchor target layer: label each anchor
positive / negative / ignored with the Matcher, sample a balanced minibatch and
encode the positives' regression targets.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from ..checks import check_float_array, pair
from ..ops.boxes import BoxCoder, box_iou, check_boxes, clip_boxes_to_image, remove_small_boxes
from ..ops.nms import batched_nms

PROPOSAL_STAGES = ("topk", "decoded", "clipped", "remove_small", "score_thresh", "nms", "final")


def generate_proposals(
    objectness,
    deltas,
    anchors,
    image_sizes,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float = 0.7,
    score_thresh: float = 0.0,
    min_size: float = 1e-3,
    box_coder: BoxCoder | None = None,
    trace: bool = False,
):
    """Proposals for a batch of images. Per level: objectness (N, H_l*W_l*A) logits flattened in
    (H, W, A) order, deltas (N, H_l*W_l*A, 4), anchors (H_l*W_l*A, 4) (AnchorGenerator.anchors_per_level).
    image_sizes: N pairs (h, w), the sizes before padding (boxes are clipped to them); box_coder: the RPN's.
    Returns (boxes, scores, records): per image, boxes[i] (R_i, 4) in the dtype of ``deltas`` and scores[i]
    (R_i,) sigmoid probabilities in decreasing order; records: every step if ``trace`` (module docstring).
    """
    box_coder = box_coder if box_coder is not None else BoxCoder((1.0, 1.0, 1.0, 1.0))
    num_images, num_per_level, pre_nms_top_n, post_nms_top_n = _check_proposal_inputs(
        objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n, min_size
    )
    level_offsets = np.cumsum([0, *num_per_level[:-1]])  # each level's first anchor index
    # --- exercise: proposals ---
    all_boxes, all_scores, records = [], [], []
    for i in range(num_images):
        # 1. top-k logits per level (stable: equal logits keep anchor order)
        parts = []
        for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
            logits = obj[i]  # (n_l,)
            top = np.argsort(-logits, kind="stable")[:pre_nms_top_n]  # (k_l,)
            parts.append((top + level_offsets[level], np.full(top.size, level), logits[top], dlt[i][top], anc[top]))
        anchor_index, levels, logits, cand_deltas, cand_anchors = (np.concatenate(p) for p in zip(*parts))
        scores = expit(logits)  # (K,)
        topk = np.arange(anchor_index.size)
        # 2. decode and clip
        decoded = box_coder.decode(cand_deltas, cand_anchors.astype(cand_deltas.dtype, copy=False))  # (K, 4)
        clipped = clip_boxes_to_image(decoded, pair(image_sizes[i], "image_sizes[i]"))

        steps = _Steps(trace, num_per_level, clipped, scores=scores, levels=levels, anchor_index=anchor_index)
        steps.note("topk", topk, cand_anchors, logits=logits, deltas=cand_deltas)
        steps.note("decoded", topk, decoded)
        steps.note("clipped", topk)
        # 3. remove small boxes, 4. score threshold (on probabilities)
        rows = remove_small_boxes(clipped, min_size)
        steps.note("remove_small", rows)
        rows = rows[scores[rows] >= score_thresh]
        steps.note("score_thresh", rows)
        # 5. NMS independently per level; the result is sorted by decreasing score over all levels
        rows = rows[batched_nms(clipped[rows], scores[rows], levels[rows], nms_thresh)]
        steps.note("nms", rows)
        # 6. the best post_nms_top_n over all levels
        rows = rows[:post_nms_top_n]
        steps.note("final", rows)
        all_boxes.append(clipped[rows])
        all_scores.append(scores[rows])
        if trace:
            records.append(steps.record)
    return all_boxes, all_scores, (records if trace else None)
    # --- end exercise ---


class _Steps:
    """The trace of the proposal layer for one image (``trace=True``): each step's surviving rows."""

    def __init__(self, enabled, num_per_level, boxes, **per_candidate):
        self.enabled, self.boxes, self.per_candidate = enabled, boxes, per_candidate
        self.record = {"num_anchors_per_level": list(num_per_level), "counts": {}}

    def note(self, name, rows, boxes=None, **extra):
        if self.enabled:
            boxes = self.boxes if boxes is None else boxes
            self.record["counts"][name] = int(rows.size)
            self.record[name] = {
                "rows": rows,
                "boxes": boxes[rows],
                **{k: v[rows] for k, v in self.per_candidate.items()},
                **extra,
            }


def assign_rpn_targets(
    anchors: np.ndarray, gt_boxes: np.ndarray, matcher, sampler, box_coder: BoxCoder, rng: np.random.Generator
):
    """The anchor target layer for one image.

    anchors (A, 4): all levels concatenated (the order of the flattened objectness);
    gt_boxes (G, 4), G may be 0; matcher: Matcher(0.7, 0.3, True) for the RPN;
    sampler: BalancedPositiveNegativeSampler(256, 0.5); rng: numpy Generator.

    Returns (labels, regression_targets):
    labels (A,) int64: 1 sampled positive, 0 sampled negative, -1 not in the
    loss (ignored by the matcher or not sampled);
    regression_targets (A, 4) in the anchors' dtype: box_coder.encode(matched GT,
    anchor) on the positive rows, 0 elsewhere.
    With no GT every anchor is background, so the sample is all negatives and
    the targets are all zero. GT boxes of zero area overlap nothing and match
    no anchor; inverted GT boxes raise ValueError.
    """
    check_boxes(anchors, "anchors")
    check_boxes(gt_boxes, "gt_boxes")
    num_anchors = anchors.shape[0]
    if gt_boxes.shape[0] == 0:
        matches = np.full(num_anchors, matcher.BELOW_LOW_THRESHOLD, dtype=np.int64)
    else:
        matches = matcher(box_iou(gt_boxes, anchors))  # (A,)
    match_labels = np.where(matches >= 0, 1, np.where(matches == matcher.BELOW_LOW_THRESHOLD, 0, -1))
    pos_mask, neg_mask = sampler(match_labels.astype(np.int64), rng)

    labels = np.full(num_anchors, -1, dtype=np.int64)
    labels[neg_mask] = 0
    labels[pos_mask] = 1
    targets = np.zeros(anchors.shape, dtype=anchors.dtype)
    if pos_mask.any():
        gt = gt_boxes[matches[pos_mask]].astype(anchors.dtype, copy=False)
        targets[pos_mask] = box_coder.encode(gt, anchors[pos_mask])
    return labels, targets


def _check_min_size(min_size):
    if not 0.0 <= min_size < np.inf:
        raise ValueError(f"min_size must be a finite number >= 0, got {min_size}")


def _count(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return int(v)


def _check_proposal_inputs(objectness, deltas, anchors, image_sizes, pre_nms_top_n, post_nms_top_n, min_size):
    """Shapes must agree level by level; returns (N, [n_l per level], pre_nms_top_n, post_nms_top_n)."""
    _check_min_size(min_size)
    counts = _count(pre_nms_top_n, "pre_nms_top_n"), _count(post_nms_top_n, "post_nms_top_n")
    num_levels = len(anchors)
    if num_levels == 0 or len(objectness) != num_levels or len(deltas) != num_levels:
        raise ValueError(
            f"objectness, deltas and anchors need one entry per level, got "
            f"{len(objectness)}, {len(deltas)} and {num_levels}"
        )
    num_images = len(image_sizes)
    num_per_level = []
    for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
        check_float_array(obj, f"objectness[{level}]", ndim=2)
        check_float_array(dlt, f"deltas[{level}]", ndim=3)
        check_boxes(anc, f"anchors[{level}]")
        n = anc.shape[0]
        if obj.shape != (num_images, n) or dlt.shape != (num_images, n, 4):
            raise ValueError(
                f"level {level}: expected objectness ({num_images}, {n}) and deltas "
                f"({num_images}, {n}, 4) for {num_images} image(s) and {n} anchors, "
                f"got {obj.shape} and {dlt.shape}"
            )
        num_per_level.append(n)
    return (num_images, num_per_level, *counts)
