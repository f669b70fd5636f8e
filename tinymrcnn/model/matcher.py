"""Matching predictions (anchors, proposals) to ground truth, and sampling a balanced minibatch.

docs/semantics.md#matcher and #sampler; the code follows torchvision's
``torchvision.models.detection._utils.Matcher`` and
``BalancedPositiveNegativeSampler``:

- RPN:      Matcher(0.7, 0.3, allow_low_quality_matches=True), sample 256, 50 % positive.
- Box head: Matcher(0.5, 0.5, allow_low_quality_matches=False), sample 512, 25 % positive.
"""

from __future__ import annotations

import numpy as np

from ..checks import check_float_array


class Matcher:
    """Give each prediction the index of its best ground-truth box, or a negative code.

    ``matcher(iou)`` with iou (G, P) (ground truth x predictions, e.g. from
    ``box_iou(gt, anchors)``) returns matches (P,) int64:

    - ``g >= 0``: matched to GT ``g`` (its highest IoU, first GT on ties), IoU >= high_threshold;
    - ``BELOW_LOW_THRESHOLD`` (-1): background, best IoU < low_threshold;
    - ``BETWEEN_THRESHOLDS`` (-2): ignored, low_threshold <= best IoU < high_threshold.

    With ``allow_low_quality_matches`` every GT also claims the predictions that
    reach its own highest IoU (ties included), so no GT is left without a
    positive (Faster R-CNN, section 3.1.2). As in torchvision such a prediction
    gets its own best GT index, which can differ from the GT that claimed it.
    One deliberate difference from torchvision: a GT whose highest IoU is 0
    (a zero-area box, or one outside every prediction) claims nothing; in
    torchvision it would turn every prediction that overlaps nothing into a
    positive.

    With no GT (G = 0) every prediction is background (-1); torchvision raises
    there, and its RPN special-cases empty images the same way.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if not 0.0 <= low_threshold <= high_threshold <= 1.0:
            raise ValueError(
                f"need 0 <= low_threshold <= high_threshold <= 1, got low={low_threshold}, high={high_threshold}"
            )
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __repr__(self) -> str:
        return (
            f"Matcher(high_threshold={self.high_threshold}, low_threshold={self.low_threshold}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )

    def __call__(self, iou: np.ndarray) -> np.ndarray:
        """iou (G, P) -> matches (P,) int64 (see the class docstring)."""
        check_float_array(iou, "iou", ndim=2)
        num_gt, num_pred = iou.shape
        if num_gt == 0:
            return np.full(num_pred, self.BELOW_LOW_THRESHOLD, dtype=np.int64)
        if num_pred == 0:
            return np.zeros(0, dtype=np.int64)

        matched_vals = iou.max(axis=0)  # (P,) best IoU per prediction
        matches = iou.argmax(axis=0).astype(np.int64)  # (P,) first best GT
        all_matches = matches.copy()
        matches[matched_vals < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[between] = self.BETWEEN_THRESHOLDS

        if self.allow_low_quality_matches:
            best_per_gt = iou.max(axis=1)  # (G,)
            claims = (iou == best_per_gt[:, None]) & (best_per_gt[:, None] > 0)  # (G, P)
            claimed = claims.any(axis=0)  # (P,)
            matches[claimed] = all_matches[claimed]
        return matches


class BalancedPositiveNegativeSampler:
    """Sample at most ``batch_size_per_image`` labels, at most ``positive_fraction`` of them positive.

    ``sampler(labels, rng)`` with labels (P,) int: >= 1 positive (1 for the RPN,
    the class id for the box head), 0 negative, -1 ignored; rng a
    ``numpy.random.Generator``. Returns (pos_mask, neg_mask), two (P,) bool
    arrays. Positives are drawn first (up to the fraction); negatives fill
    the rest of the batch. Uniform random choice without replacement, so a
    seeded Generator gives the same sample every time.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if int(batch_size_per_image) < 0:
            raise ValueError(f"batch_size_per_image must be >= 0, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __repr__(self) -> str:
        return (
            f"BalancedPositiveNegativeSampler(batch_size_per_image={self.batch_size_per_image}, "
            f"positive_fraction={self.positive_fraction})"
        )

    def __call__(self, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                "labels must be a 1-d integer array (>= 1 positive, 0 negative, -1 ignored), "
                f"got {getattr(labels, 'dtype', type(labels).__name__)} "
                f"{getattr(labels, 'shape', '')}"
            )
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        positive = np.flatnonzero(labels >= 1)
        negative = np.flatnonzero(labels == 0)
        num_pos = min(positive.size, int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.size, self.batch_size_per_image - num_pos)
        pos_mask = np.zeros(labels.shape, dtype=bool)
        neg_mask = np.zeros(labels.shape, dtype=bool)
        pos_mask[positive[rng.permutation(positive.size)[:num_pos]]] = True
        neg_mask[negative[rng.permutation(negative.size)[:num_neg]]] = True
        return pos_mask, neg_mask
