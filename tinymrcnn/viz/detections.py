"""Drawing predictions: masks, boxes, labels and scores over the image."""

from __future__ import annotations

import numpy as np

PALETTE = np.array(
    [
        [0.90, 0.10, 0.10],
        [0.10, 0.60, 0.95],
        [0.15, 0.80, 0.25],
        [0.95, 0.70, 0.10],
        [0.70, 0.20, 0.85],
        [0.10, 0.85, 0.85],
        [0.95, 0.45, 0.65],
        [0.55, 0.55, 0.10],
    ]
)


def overlay_masks(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """(3, H, W) image and (N, H, W) binary masks -> (H, W, 3) RGB with coloured masks."""
    rgb = np.clip(image.transpose(1, 2, 0), 0, 1).astype(np.float64).copy()
    for i, m in enumerate(masks):
        m = m.astype(bool)
        rgb[m] = (1 - alpha) * rgb[m] + alpha * PALETTE[i % len(PALETTE)]
    return rgb


def draw_prediction(ax, image, pred, class_names=None, score_thresh: float = 0.5, title=None):
    """Draw one image's detections on a matplotlib axis.

    pred: dict with boxes (N, 4), labels (N,), scores (N,), masks (N, H, W)
    probabilities (thresholded at 0.5) or binary masks.
    """
    from matplotlib.patches import Rectangle

    keep = np.flatnonzero(pred["scores"] >= score_thresh) if len(pred["scores"]) else np.zeros(0, int)
    masks = (pred["masks"][keep] >= 0.5) if len(keep) else np.zeros((0,) + image.shape[1:], bool)
    ax.imshow(overlay_masks(image, masks))
    for j, i in enumerate(keep):
        x1, y1, x2, y2 = pred["boxes"][i]
        color = PALETTE[j % len(PALETTE)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, lw=1.5))
        label = int(pred["labels"][i])
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        ax.text(
            x1,
            y1 - 1,
            f"{name} {pred['scores'][i]:.2f}",
            color="white",
            fontsize=7,
            bbox=dict(facecolor=color, alpha=0.8, pad=1, lw=0),
        )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def save_prediction_image(image, pred, path, class_names=None, score_thresh: float = 0.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[1:]
    fig, ax = plt.subplots(figsize=(max(3, w / 100), max(3, h / 100)))
    draw_prediction(ax, image, pred, class_names, score_thresh)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_predictions_grid(images, preds, path, class_names=None, targets=None, score_thresh: float = 0.5):
    """Ground truth (top row, if given) and predictions (bottom row) for a few images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = 2 if targets is not None else 1
    fig, axes = plt.subplots(rows, n, figsize=(2.2 * n, 2.3 * rows), squeeze=False)
    for i in range(n):
        if targets is not None:
            t = targets[i]
            gt = {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": np.ones(len(t["labels"])),
                "masks": t["masks"].astype(np.float32),
            }
            draw_prediction(axes[0, i], images[i], gt, class_names, 0.5, title="ground truth")
        draw_prediction(axes[rows - 1, i], images[i], preds[i], class_names, score_thresh, title="prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
