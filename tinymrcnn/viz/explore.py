"""Looking inside a model: RPN recall, ground truth x prediction overlaps, layer activations.

The numbers come from :meth:`MaskRCNN.inspect` (one inference pass, every
intermediate), so any model can be looked at, trained or not:

    info = model.inspect(image, layers=["backbone.body.layer2"])
    rpn_recall(info, target["boxes"])          # anchors, refined anchors, proposals at IoU 0.5 / 0.7
    draw_iou_grid(ax, target["boxes"], info["result"]["boxes"], ...)
    draw_activations(info["activations"]["backbone.body.layer2"])

The layer outputs are recorded by ``tinymrcnn.runtime.record_layers``, which
wraps the named layers' ``forward`` from outside the model for one pass;
``tinymrcnn.runtime.layer_names(model)`` lists the names.
"""

from __future__ import annotations

import numpy as np

from ..ops.boxes import box_iou

RPN_STAGES = ("anchors", "refined anchors", "proposals")


def recall(gt_boxes, boxes, thresholds=(0.5, 0.7)) -> dict:
    """Fraction of ground-truth boxes that some box overlaps with IoU >= each threshold.

    Args:
        gt_boxes: (G, 4) (x1, y1, x2, y2).
        boxes: (B, 4) candidates, any order.

    Returns:
        {threshold: recall}; 1.0 for every threshold when there is no
        ground truth, 0.0 when there are no candidates.
    """
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(gt_boxes) == 0:
        return {t: 1.0 for t in thresholds}
    if len(boxes) == 0:
        return {t: 0.0 for t in thresholds}
    best = box_iou(gt_boxes, boxes).max(axis=1)  # each GT box's best overlap
    return {t: float(np.mean(best >= t)) for t in thresholds}


def rpn_boxes(info) -> dict:
    """The RPN's three sets of boxes from ``model.inspect``, in the transformed image's pixels.

    "anchors": every anchor of every level; "refined anchors": each anchor
    moved by its predicted deltas (decoded and clipped, before top-K or NMS);
    "proposals": what the proposal layer keeps after NMS and top-N.
    """
    return {
        "anchors": np.concatenate(info["anchors"]),
        "refined anchors": np.concatenate(info["refined_anchors"]),
        "proposals": info["proposals"],
    }


def to_model_frame(info, boxes):
    """Boxes in the original image's pixels -> the transformed image's (where anchors and proposals live)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    (h0, w0), (h1, w1) = info["image"].shape[-2:], info["image_size"]
    return boxes * np.array([w1 / w0, h1 / h0, w1 / w0, h1 / h0])


def rpn_recall(info, gt_boxes, thresholds=(0.5, 0.7)) -> dict:
    """RPN recall of anchors, refined anchors and post-NMS proposals.

    Args:
        info: ``model.inspect(image)``.
        gt_boxes: (G, 4) ground truth in the original image's pixels.

    Returns:
        {stage: {threshold: recall}} for the stages of :data:`RPN_STAGES`,
        plus "counts": {stage: number of boxes}.
    """
    gt = to_model_frame(info, gt_boxes)
    sets = rpn_boxes(info)
    out = {name: recall(gt, boxes, thresholds) for name, boxes in sets.items()}
    out["counts"] = {name: len(boxes) for name, boxes in sets.items()}
    return out


def draw_rpn_recall(ax, recalls, title=None):
    """Grouped bars: recall per stage (anchors, refined anchors, proposals) and IoU threshold."""
    stages = [s for s in RPN_STAGES if s in recalls]
    thresholds = list(recalls[stages[0]])
    width = 0.8 / len(thresholds)
    for k, t in enumerate(thresholds):
        xs = np.arange(len(stages)) + (k - (len(thresholds) - 1) / 2) * width
        values = [recalls[s][t] for s in stages]
        ax.bar(xs, values, width, label=f"IoU >= {t}")
        for x, v in zip(xs, values):
            ax.text(x, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    counts = recalls.get("counts", {})
    ax.set_xticks(range(len(stages)), [f"{s}\n({counts[s]})" if s in counts else s for s in stages])
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("recall of the ground-truth boxes")
    ax.legend(fontsize=8, loc="upper center", ncol=len(thresholds))
    ax.set_title(title or "RPN recall", fontsize=10)


def iou_grid(gt_boxes, pred_boxes) -> np.ndarray:
    """(G, P) box IoU of every ground-truth box with every prediction."""
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    pred = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    if len(gt) == 0 or len(pred) == 0:
        return np.zeros((len(gt), len(pred)))
    return box_iou(gt, pred)


def draw_iou_grid(
    ax,
    gt_boxes,
    pred_boxes,
    gt_labels=None,
    pred_labels=None,
    scores=None,
    class_names=None,
    threshold=0.5,
    max_predictions=20,
    title=None,
):
    """The ground truth x prediction IoU grid, predictions by descending score.

    A cell shows the IoU; it is framed in green when IoU >= ``threshold``
    and the classes agree (a match), in red when they overlap that much but
    the classes differ. Returns the (G, P) grid drawn.
    """
    from matplotlib.patches import Rectangle

    pred_boxes = np.asarray(pred_boxes).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores))[:max_predictions] if scores is not None else np.arange(len(pred_boxes))
    grid = iou_grid(gt_boxes, pred_boxes[order])

    def name(labels, i):
        if labels is None:
            return ""
        k = int(labels[i])
        return class_names[k] if class_names is not None else str(k)

    ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (g, p), v in np.ndenumerate(grid):
        ax.text(p, g, f"{v:.2f}" if v > 0 else "0", ha="center", va="center", fontsize=7,
                color="white" if v > 0.6 else "black")  # fmt: skip
        if v >= threshold and gt_labels is not None and pred_labels is not None:
            same = int(gt_labels[g]) == int(pred_labels[order[p]])
            ax.add_patch(Rectangle((p - 0.5, g - 0.5), 1, 1, fill=False, ec="green" if same else "red", lw=2))
    cols = [f"{name(pred_labels, i)} {scores[i]:.2f}" if scores is not None else name(pred_labels, i) for i in order]
    ax.set_xticks(range(len(order)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(grid)), [f"GT {g} {name(gt_labels, g)}" for g in range(len(grid))], fontsize=7)
    ax.set_xlabel("predictions (class, score), best first")
    ax.set_title(title or f"IoU of ground truth x predictions (frame: IoU >= {threshold})", fontsize=10)
    return grid


def draw_activations(activation, max_channels=16, columns=8, title=None, fig=None):
    """The channels of one layer's output (C, H, W) or (N, C, H, W) (the first image), most active first.

    Channels are ordered by their mean absolute value and each is drawn on
    its own colour scale; the panel title gives its index and range.
    Returns the matplotlib Figure (no pyplot).
    """
    from matplotlib.figure import Figure

    act = np.asarray(activation)
    if act.ndim == 4:
        act = act[0]
    if act.ndim != 3:
        raise ValueError(f"expected an activation of shape (C, H, W) or (N, C, H, W), got {np.shape(activation)}")
    order = np.argsort(-np.abs(act).mean(axis=(1, 2)), kind="stable")[:max_channels]
    rows = -(-len(order) // columns)
    fig = fig or Figure(figsize=(1.9 * min(columns, len(order)), 2.0 * rows + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, min(columns, len(order)), squeeze=False).ravel())
    for ax, c in zip(axes, order):
        ax.imshow(act[c], cmap="viridis")
        ax.set_title(f"ch {c}: {act[c].min():.2g}..{act[c].max():.2g}", fontsize=7)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes[len(order) :]:
        ax.set_visible(False)
    C, H, W = act.shape
    fig.suptitle(title or f"{C} channels of {H} x {W}: the {len(order)} most active", fontsize=10)
    fig.tight_layout()
    return fig
