"""Precision-recall curves from :func:`tinymrcnn.evaluate.coco_evaluate`'s output.

The curves are COCO's interpolated ones: ``result["precision"]`` holds, for
each IoU threshold, category and area range, the monotone-envelope
precision at the 101 recall levels 0, 0.01, ..., 1. The AP of a curve is
the mean of its 101 values, i.e. the area under it; the legend shows it.
"""

from __future__ import annotations

import numpy as np


def plot_precision_recall(result: dict, ax=None, iou_thresholds=(0.5, 0.75), area: str = "all", path=None, title=None):
    """Draw one curve per category and IoU threshold (plus the category mean), return the Figure.

    result: coco_evaluate's dict; ax: a matplotlib Axes to draw into (a new
    Figure when None, no pyplot needed); iou_thresholds: which thresholds to
    draw (solid, dashed, dotted, ...); area: "all", "small", "medium" or
    "large"; path: also save the figure there (PNG).
    Categories without ground truth (precision -1) are left out.
    """
    from matplotlib.figure import Figure

    if ax is None:
        fig = Figure(figsize=(6, 4.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    precision = np.asarray(result["precision"])  # (T, R, K, A)
    recall_levels = np.asarray(result["recall_thresholds"])  # (R,)
    a = list(result["area_ranges"]).index(area)
    styles = ["-", "--", ":", "-."]
    for j, thr in enumerate(iou_thresholds):
        t = int(np.argmin(np.abs(np.asarray(result["iou_thresholds"]) - thr)))
        curves = precision[t, :, :, a]  # (R, K)
        valid = curves[0] > -1  # categories with ground truth
        for k, name in enumerate(result["class_names"]):
            if valid[k]:
                ax.plot(
                    recall_levels,
                    curves[:, k],
                    styles[j % len(styles)],
                    color=f"C{k}",
                    lw=1.2,
                    label=f"{name} IoU={thr:.2f} (AP {curves[:, k].mean():.3f})",
                )
        if valid.sum() > 1:
            mean = curves[:, valid].mean(axis=1)
            ax.plot(
                recall_levels,
                mean,
                styles[j % len(styles)],
                color="black",
                lw=2,
                label=f"mean IoU={thr:.2f} (AP {mean.mean():.3f})",
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated)")
    kind = {"segm": "mask", "bbox": "box"}.get(result.get("iou_type"), "")
    ax.set_title(
        title
        or f"{kind} precision-recall, area {area}: AP {result['AP']:.3f}, "
        f"AP50 {result['AP50']:.3f}, AP75 {result['AP75']:.3f}"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
