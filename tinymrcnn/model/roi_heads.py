"""RoI heads: proposal targets, box head, mask head, their losses and inference.

Steps 5-8 and inference in docs/walkthrough.md; docs/semantics.md#box-head and
docs/semantics.md#mask-head.

Training (``forward`` with targets):
  1. proposal targets: append the GT boxes to the proposals, match them
     (IoU >= 0.5 foreground), sample ``box_batch_size_per_image`` with at
     most 25 % positives, and encode the regression targets;
  2. box branch: MultiScaleRoIAlign 7x7 -> TwoMLPHead -> class logits and
     class-specific deltas; softmax cross-entropy + smooth L1 on the GT class;
  3. mask branch, positives only: MultiScaleRoIAlign 14x14 -> FCN -> K masks of
     28x28; per-pixel sigmoid BCE on the GT class's channel only.
:meth:`RoIHeads.forward_train` returns the three losses and their gradients
with respect to the class logits, the box deltas and the mask logits;
``MaskRCNN.backward`` carries them back through the heads and the poolers.

Inference (``forward`` without targets): softmax, per-class decode, clip,
score threshold, per-class NMS, top-N, then the mask branch on the kept boxes
only and the predicted class's channel through a sigmoid.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from .. import losses
from ..nn import Linear, Module, ReLU
from ..ops import roi_align
from ..ops.boxes import BoxCoder, box_iou, clip_boxes_to_image, remove_small_boxes
from ..ops.nms import batched_nms, decay_across_classes
from .mask_head import MaskHead
from .matcher import BalancedPositiveNegativeSampler, Matcher
from .poolers import MultiScaleRoIAlign


class TwoMLPHead(Module):
    """flatten (R, D*7*7) -> fc6 -> ReLU -> fc7 -> ReLU -> (R, rep)."""

    def __init__(self, in_features: int, representation_size: int, rng=None):
        super().__init__()
        self.fc6 = Linear(in_features, representation_size, rng=rng)
        self.relu6 = ReLU()
        self.fc7 = Linear(representation_size, representation_size, rng=rng)
        self.relu7 = ReLU()

    def forward(self, x):  # x (R, D, 7, 7)
        self.save(x.shape)
        h = x.reshape(x.shape[0], -1)  # (R, D*49)
        return self.relu7(self.fc7(self.relu6(self.fc6(h))))

    def backward(self, dy):
        (shape,) = self.restore()
        d = self.fc6.backward(self.relu6.backward(self.fc7.backward(self.relu7.backward(dy))))
        return d.reshape(shape)


class FastRCNNPredictor(Module):
    """cls_score (rep -> K) and bbox_pred (rep -> 4K) on the same features."""

    def __init__(self, in_features: int, num_classes: int, rng=None):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        self.cls_score = Linear(in_features, num_classes, rng=rng)
        self.bbox_pred = Linear(in_features, num_classes * 4, rng=rng)
        # Small initial outputs (detectron2: std 0.01 and 0.001) so the first
        # steps start from uniform class scores and near-zero box deltas.
        self.cls_score.weight.data = (rng.standard_normal(self.cls_score.weight.shape) * 0.01).astype(np.float32)
        self.bbox_pred.weight.data = (rng.standard_normal(self.bbox_pred.weight.shape) * 0.001).astype(np.float32)
        self.cls_score.bias.data[...] = 0.0
        self.bbox_pred.bias.data[...] = 0.0

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)

    def backward(self, grads):
        d_cls, d_box = grads
        return self.cls_score.backward(d_cls) + self.bbox_pred.backward(d_box)


def _make_rois(boxes_per_image):
    """[(R_i, 4)] -> (sum R_i, 5) rows [batch_index, x1, y1, x2, y2]."""
    if not boxes_per_image:
        return np.zeros((0, 5), np.float32)
    parts = [np.concatenate([np.full((len(b), 1), i, dtype=b.dtype), b], axis=1) for i, b in enumerate(boxes_per_image)]
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


class RoIHeads(Module):
    def __init__(self, config, rng=None):
        super().__init__()
        c = self.config = config
        rng = np.random.default_rng(0) if rng is None else rng
        pool_kw = dict(
            op=c.roi_op,
            mode=c.roi_align_mode,
            aligned=c.roi_aligned,
            sampling_ratio=c.roi_sampling_ratio,
            canonical_scale=c.canonical_scale,
            canonical_level=c.canonical_level,
        )
        self.box_roi_pool = MultiScaleRoIAlign(output_size=c.box_roi_size, **pool_kw)
        self.box_head = TwoMLPHead(c.fpn_channels * c.box_roi_size**2, c.box_representation_size, rng)
        self.box_predictor = FastRCNNPredictor(c.box_representation_size, c.num_classes, rng)
        self.mask_roi_pool = MultiScaleRoIAlign(output_size=c.mask_roi_size, **pool_kw)
        self.mask_head = MaskHead(c.fpn_channels, c.mask_channels, c.mask_num_convs, c.num_classes, rng)
        self.box_coder = BoxCoder(weights=c.box_coder_weights)
        self.matcher = Matcher(c.box_fg_iou_thresh, c.box_bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(c.box_batch_size_per_image, c.box_positive_fraction)

    # ------------------------------------------------------------------ targets
    def select_training_samples(self, proposals, targets, rng):
        """Proposal target layer (docs/semantics.md#box-head): per image, returns

        sampled proposals (S_i, 4), their labels (S_i,) in 0..K-1, regression
        targets (S_i, 4) and the index of the matched GT (S_i,) (-1 for background).
        """
        out = []
        for props, tgt in zip(proposals, targets):
            gt_boxes = tgt["boxes"].astype(props.dtype)
            gt_labels = tgt["labels"]
            props = np.concatenate([props, gt_boxes], axis=0)  # GT boxes join the proposals
            if len(gt_boxes) == 0:
                matched = np.full(len(props), -1, dtype=np.int64)
            else:
                matched = self.matcher(box_iou(gt_boxes, props))  # (P,) gt index, -1 bg, -2 ignore
            labels = np.zeros(len(props), dtype=np.int64)  # background
            labels[matched >= 0] = gt_labels[matched[matched >= 0]]
            sampler_labels = np.where(matched >= 0, 1, np.where(matched == -1, 0, -1))
            pos, neg = self.sampler(sampler_labels, rng)
            keep = np.flatnonzero(pos | neg)
            props, labels, matched = props[keep], labels[keep], matched[keep]
            targets_reg = np.zeros_like(props)
            fg = matched >= 0
            if fg.any():
                targets_reg[fg] = self.box_coder.encode(gt_boxes[matched[fg]], props[fg])
            out.append((np.ascontiguousarray(props), labels, targets_reg, np.where(fg, matched, -1)))
        return out

    def mask_positives(self, labels, rng):
        """Indices of the sampled RoIs of one image that train the mask branch: the
        positives, or a random subset of mask_batch_size_per_image of them (in order)."""
        pos = np.flatnonzero(labels > 0)
        cap = self.config.mask_batch_size_per_image
        if cap is None or len(pos) <= cap:
            return pos
        return np.sort(rng.choice(pos, cap, replace=False))

    def mask_targets(self, gt_masks, boxes, matched):
        """RoIAlign the matched GT masks onto the positive proposals: (P, M, M) in [0, 1].

        torchvision: aligned=False, adaptive sampling, soft targets; detectron2:
        aligned=True and threshold at 0.5. Both are config switches.
        """
        c = self.config
        m = 2 * c.mask_roi_size
        if len(boxes) == 0:
            return np.zeros((0, m, m), dtype=boxes.dtype)
        masks = np.ascontiguousarray(gt_masks[:, None].astype(boxes.dtype))  # (G, 1, H, W)
        rois = np.concatenate([matched[:, None].astype(boxes.dtype), boxes], axis=1)
        t = roi_align(
            masks,
            np.ascontiguousarray(rois),
            (m, m),
            spatial_scale=1.0,
            sampling_ratio=0,
            aligned=c.mask_target_aligned,
        )[:, 0]
        if c.mask_target_mode == "threshold":
            return (t >= 0.5).astype(boxes.dtype)
        # Averages of 0/1 pixels, but float rounding can overshoot 1 by an ulp.
        return np.clip(t, 0.0, 1.0)

    def mask_training_samples(self, samples, targets, rng):
        """The RoIs that train the mask branch, their labels and their 28x28 targets.

        Returns mask_rois (P, 5), labels (P,) and targets (P, M, M); P may be 0.
        """
        chosen = [self.mask_positives(s[1], rng) for s in samples]  # indices into each image's samples
        boxes = [s[0][i] for s, i in zip(samples, chosen)]
        labels = np.concatenate([s[1][i] for s, i in zip(samples, chosen)])
        tgts = np.concatenate(
            [self.mask_targets(t["masks"], b, s[3][i]) for t, b, s, i in zip(targets, boxes, samples, chosen)]
        )
        return _make_rois(boxes), labels, tgts

    # ------------------------------------------------------------------ training
    def forward_train(self, features, proposals, targets, rng):
        """The box and mask branches on sampled proposals, with their losses.

        Args:
            features: [P2, P3, P4, P5], each (N, D, H_k, W_k).
            proposals: [(R_i, 4)] per image; targets: dicts with boxes, labels, masks.
            rng: numpy Generator for the samplers.

        Returns:
            losses: {"loss_classifier", "loss_box_reg", "loss_mask"} as floats;
            grads: {"class_logits" (R, K), "box_regression" (R, 4K),
                "mask_logits" (P, K, 28, 28)}: each loss's gradient, for MaskRCNN.backward;
            info: the sampled RoIs and the head outputs (for notebooks).
        """
        c = self.config
        features = self.box_roi_pool.prepare(features)  # once, for both poolers
        samples = self.select_training_samples(proposals, targets, rng)
        rois = _make_rois([s[0] for s in samples])  # (R, 5)
        labels = np.concatenate([s[1] for s in samples])  # (R,)
        reg_targets = np.concatenate([s[2] for s in samples])  # (R, 4)
        box_feats = self.box_roi_pool(features, rois)  # (R, D, 7, 7)
        class_logits, box_regression = self.box_predictor(self.box_head(box_feats))
        (loss_cls, loss_box), (d_cls, d_box) = losses.fast_rcnn_loss(
            class_logits, box_regression, labels, reg_targets, beta=c.box_smooth_l1_beta
        )
        # the mask branch, on the positives only (at most mask_batch_size_per_image per image)
        mask_rois, mask_labels, mask_tgts = self.mask_training_samples(samples, targets, rng)
        mask_logits = self.mask_head(self.mask_roi_pool(features, mask_rois))  # (P, K, 28, 28)
        loss_fn = losses.mask_loss if c.mask_loss_type == "sigmoid" else losses.mask_loss_softmax
        loss_mask, d_mask = loss_fn(mask_logits, mask_labels, mask_tgts)
        loss_dict = {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}
        grads = {"class_logits": d_cls, "box_regression": d_box, "mask_logits": d_mask}
        info = {
            "rois": rois,
            "roi_labels": labels,
            "class_logits": class_logits,
            "mask_rois": mask_rois,
            "mask_logits": mask_logits,
        }
        return loss_dict, grads, info

    # ------------------------------------------------------------------ inference
    def forward(self, features, proposals, image_sizes):
        """Inference: detections (a dict per image: boxes, labels, scores, mask_probs (D_i, 28, 28))
        and info (the RoIs and the head outputs, for inspect())."""
        features = self.box_roi_pool.prepare(features)  # once, for both poolers
        rois = _make_rois(proposals)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, rois)))
        detections = self.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
        det_rois = _make_rois([d["boxes"] for d in detections])
        mask_logits = self.mask_head(self.mask_roi_pool(features, det_rois))  # (D, K, 28, 28)
        labels = np.concatenate([d["labels"] for d in detections])
        probs = expit(mask_logits[np.arange(len(labels)), labels])  # the predicted class
        start = 0
        for d in detections:
            n = len(d["boxes"])
            d["mask_probs"] = probs[start : start + n]
            start += n
        info = {
            "rois": rois,
            "class_logits": class_logits,
            "box_regression": box_regression,
            "mask_logits": mask_logits,
        }
        return detections, info

    def postprocess_detections(self, class_logits, box_regression, proposals, image_sizes):
        """Softmax, per-class decode, clip, threshold, per-class NMS, cross-class decay, top-N
        (docs/semantics.md#box-head)."""
        c = self.config
        k = c.num_classes
        z = class_logits - class_logits.max(axis=1, keepdims=True)
        scores_all = np.exp(z)
        scores_all /= scores_all.sum(axis=1, keepdims=True)  # (R, K)
        out = []
        start = 0
        for props, size in zip(proposals, image_sizes):
            n = len(props)
            sc = scores_all[start : start + n]
            reg = box_regression[start : start + n]
            start += n
            boxes = self.box_coder.decode(reg, props).reshape(n, k, 4)  # (n, K, 4)
            boxes = clip_boxes_to_image(boxes.reshape(-1, 4), size).reshape(n, k, 4)
            labels = np.broadcast_to(np.arange(k), (n, k))
            boxes, sc, labels = boxes[:, 1:].reshape(-1, 4), sc[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = np.flatnonzero(sc > c.box_score_thresh)
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            keep = remove_small_boxes(boxes, c.box_min_size)
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            keep = batched_nms(np.ascontiguousarray(boxes), np.ascontiguousarray(sc), labels, c.box_nms_thresh)
            boxes, sc, labels = boxes[keep], sc[keep], labels[keep]
            if c.box_cross_class_decay < 1.0:
                sc = decay_across_classes(boxes, sc, labels, c.box_nms_thresh, c.box_cross_class_decay)
            keep = np.argsort(-sc, kind="stable")[: c.box_detections_per_img]
            out.append(
                {
                    "boxes": np.ascontiguousarray(boxes[keep], dtype=np.float32),
                    "scores": np.ascontiguousarray(sc[keep], dtype=np.float32),
                    "labels": labels[keep].astype(np.int64),
                }
            )
        return out
