"""Region Proposal Network: head, losses and proposals (steps 3-4 of docs/walkthrough.md).

For every pyramid level P2..P6 the same small head predicts, at every
position and for each of the A anchors there, an objectness logit and four
box deltas. Training compares them with targets from the anchor matcher;
inference (and training too) turns them into proposals with the proposal
layer of :mod:`tinymrcnn.model.proposals`.

Gradient flow: losses -> (objectness, deltas) per level -> head
(called once per level with shared weights, so its backward runs once per
level in reverse order and the weight gradients add up) -> dP per level.
No gradient flows through the proposals themselves (the paper, and
torchvision, detach them).
"""
from __future__ import annotations

import numpy as np

from .. import losses
from ..nn import Conv2d, Module, ReLU
from ..ops.boxes import BoxCoder
from ..profiling import timed
from .anchors import AnchorGenerator
from .matcher import BalancedPositiveNegativeSampler, Matcher
from .proposals import assign_rpn_targets, generate_proposals


class RPNHead(Module):
    """3x3 conv (D -> D) + ReLU, then 1x1 convs to A logits and 4A deltas.

    Weights N(0, 0.01), biases 0 (as torchvision). Names as torchvision: conv,
    cls_logits, bbox_pred.
    """

    def __init__(self, channels: int, num_anchors: int, rng=None):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        self.conv = Conv2d(channels, channels, 3, padding=1, rng=rng)
        self.relu = ReLU()
        self.cls_logits = Conv2d(channels, num_anchors, 1, rng=rng)
        self.bbox_pred = Conv2d(channels, 4 * num_anchors, 1, rng=rng)
        for conv in (self.conv, self.cls_logits, self.bbox_pred):
            conv.weight.data = (rng.standard_normal(conv.weight.data.shape) * 0.01).astype(np.float32)
            conv.bias.data[...] = 0.0

    def forward(self, x):
        """x (N, D, H, W) -> logits (N, A, H, W), deltas (N, 4A, H, W)."""
        t = self.relu(self.conv(x))
        return self.cls_logits(t), self.bbox_pred(t)

    def backward(self, grads):
        d_logits, d_deltas = grads
        d_t = self.cls_logits.backward(d_logits) + self.bbox_pred.backward(d_deltas)
        return self.conv.backward(self.relu.backward(d_t))


def flatten_head_outputs(logits, deltas):
    """(N, A, H, W), (N, 4A, H, W) -> (N, H*W*A), (N, H*W*A, 4), the anchors' (H, W, A) order."""
    n, a, h, w = logits.shape
    flat_logits = logits.transpose(0, 2, 3, 1).reshape(n, h * w * a)
    flat_deltas = deltas.reshape(n, a, 4, h, w).transpose(0, 3, 4, 1, 2).reshape(n, h * w * a, 4)
    return np.ascontiguousarray(flat_logits), np.ascontiguousarray(flat_deltas)


def unflatten_head_grads(d_logits, d_deltas, shape):
    """Inverse of :func:`flatten_head_outputs` for gradients; shape = (N, A, H, W)."""
    n, a, h, w = shape
    gl = d_logits.reshape(n, h, w, a).transpose(0, 3, 1, 2)
    gd = d_deltas.reshape(n, h, w, a, 4).transpose(0, 3, 4, 1, 2).reshape(n, 4 * a, h, w)
    return np.ascontiguousarray(gl), np.ascontiguousarray(gd)


class RegionProposalNetwork(Module):
    """Anchors + head + proposal layer + (in training) the RPN losses."""

    def __init__(self, config, rng=None):
        super().__init__()
        c = config
        self.config = c
        self.anchor_generator = AnchorGenerator(
            sizes=tuple((s,) for s in c.anchor_sizes),
            aspect_ratios=(tuple(c.aspect_ratios),) * len(c.anchor_sizes),
            cell_centered=c.anchor_cell_centered)
        self.head = RPNHead(c.fpn_channels, c.num_anchors_per_location, rng)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(c.rpn_fg_iou_thresh, c.rpn_bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(c.rpn_batch_size_per_image, c.rpn_positive_fraction)
        self.timer = None

    def forward(self, features, image_sizes, padded_size, targets=None, rng=None):
        """Run the head on every level and make proposals.

        Args:
            features: [P2, ..., P6], each (N, D, H_k, W_k).
            image_sizes: [(h, w)] per image, the size before padding (clip boxes to it).
            padded_size: (H, W) of the padded batch (anchor strides come from it).
            targets: in training, a list of dicts with "boxes" (G, 4).
            rng: numpy Generator for the anchor sampler (training).

        Returns:
            proposals: list of (R_i, 4) arrays, one per image;
            losses: dict with loss_objectness and loss_rpn_box_reg (training), else {};
            info: intermediates for inspect() (anchors, objectness, proposal steps).
        """
        c = self.config
        logits, deltas, shapes = [], [], []
        with timed(self.timer, "rpn head"):
            for p in features:
                l, d = self.head(p)
                shapes.append(l.shape)
                fl, fd = flatten_head_outputs(l, d)
                logits.append(fl)
                deltas.append(fd)
        anchors = self.anchor_generator.anchors_per_level(padded_size, [s[-2:] for s in shapes],
                                                          dtype=features[0].dtype)
        training = targets is not None
        pre_n = c.rpn_pre_nms_top_n_train if training else c.rpn_pre_nms_top_n_test
        post_n = c.rpn_post_nms_top_n_train if training else c.rpn_post_nms_top_n_test
        with timed(self.timer, "proposals"):
            proposals, scores, record = generate_proposals(
                logits, deltas, anchors, image_sizes, pre_nms_top_n=pre_n, post_nms_top_n=post_n,
                nms_thresh=c.rpn_nms_thresh, score_thresh=c.rpn_score_thresh, min_size=c.rpn_min_size,
                box_coder=self.box_coder)
        info = {"anchors": anchors, "objectness": logits, "rpn_deltas": deltas,
                "proposal_steps": record, "proposal_scores": scores}
        loss_dict = {}
        if training:
            with timed(self.timer, "rpn targets + losses"):
                loss_dict, grads = self._losses(logits, deltas, anchors, targets, rng)
            self.save(grads, shapes)
        return proposals, loss_dict, info

    def _losses(self, logits, deltas, anchors, targets, rng):
        """BCE objectness on the sampled anchors + smooth L1 on the positives.

        Both are divided by the number of sampled anchors over the batch
        (docs/semantics.md#rpn-losses). Returns the losses and their gradients w.r.t. the flattened
        logits and deltas of every level.
        """
        c = self.config
        n = logits[0].shape[0]
        level_sizes = [l.shape[1] for l in logits]
        all_logits = np.concatenate(logits, axis=1)              # (N, A_total)
        all_deltas = np.concatenate(deltas, axis=1)              # (N, A_total, 4)
        all_anchors = np.concatenate(anchors, axis=0)            # (A_total, 4)
        labels = np.empty(all_logits.shape, dtype=np.float64)
        reg_targets = np.zeros(all_deltas.shape, dtype=all_deltas.dtype)
        for i in range(n):
            lab, tgt = assign_rpn_targets(all_anchors, targets[i]["boxes"], self.matcher, self.sampler,
                                          self.box_coder, rng)
            labels[i] = lab
            reg_targets[i] = tgt
        sampled = labels >= 0
        positive = labels == 1
        num_sampled = max(int(sampled.sum()), 1)
        # Objectness: BCE over sampled anchors, averaged over them.
        obj_loss, d_obj = losses.sigmoid_bce_with_logits(all_logits[sampled], labels[sampled].astype(all_logits.dtype),
                                                         reduction="sum")
        # Box regression: smooth L1 (beta 1/9) on positives, divided by the sampled count.
        box_loss, d_box = losses.smooth_l1(all_deltas[positive], reg_targets[positive],
                                           beta=c.rpn_smooth_l1_beta, reduction="sum")
        g_logits = np.zeros_like(all_logits)
        g_logits[sampled] = d_obj / num_sampled
        g_deltas = np.zeros_like(all_deltas)
        g_deltas[positive] = d_box / num_sampled
        splits = np.cumsum(level_sizes)[:-1]
        grads = list(zip(np.split(g_logits, splits, axis=1), np.split(g_deltas, splits, axis=1)))
        loss_dict = {"loss_objectness": float(obj_loss) / num_sampled,
                     "loss_rpn_box_reg": float(box_loss) / num_sampled}
        return loss_dict, grads

    def backward(self):
        """Gradients of the RPN losses w.r.t. every level's features: [dP2, ..., dP6]."""
        grads, shapes = self.restore()
        d_features = [None] * len(shapes)
        for k in range(len(shapes) - 1, -1, -1):           # reverse of the forward order
            gl, gd = unflatten_head_grads(grads[k][0], grads[k][1], shapes[k])
            d_features[k] = self.head.backward((gl, gd))
        return d_features
