"""Region Proposal Network: head, losses and proposals (steps 3-4 of docs/walkthrough.md).

For every pyramid level P2..P6 the same small head predicts, at every
position and for each of the A anchors there, an objectness logit and four
box deltas. Training compares them with targets from the anchor matcher;
inference (and training too) turns them into proposals with the proposal
layer of :mod:`tinymrcnn.model.proposals`.

Training (docs/semantics.md, "RPN losses"): :meth:`RegionProposalNetwork.loss` matches anchors to
the ground truth and scores the head's outputs with :func:`losses.rpn_loss`;
it returns the gradients with respect to each level's head outputs, in the
head's (N, A, H, W) / (N, 4A, H, W) layout. ``MaskRCNN.backward`` hands them to
``rpn.head.backward`` once per level, in reverse order (the head is shared
by the levels, so its weight gradients add up). No gradient flows through
the proposals themselves (the paper, and torchvision, detach them).
"""

from __future__ import annotations

import numpy as np

from .. import losses
from ..nn import Conv2d, Module, ReLU
from ..ops.boxes import BoxCoder
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
    """Anchors + head + proposal layer; :meth:`loss` gives the RPN's losses and their gradients."""

    def __init__(self, config, rng=None):
        super().__init__()
        c = config
        self.config = c
        self.anchor_generator = AnchorGenerator(
            sizes=c.anchor_sizes_per_level,
            aspect_ratios=(tuple(c.aspect_ratios),) * len(c.anchor_sizes),
            cell_centered=c.anchor_cell_centered,
        )
        self.head = RPNHead(c.fpn_channels, c.num_anchors_per_location, rng)
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(c.rpn_fg_iou_thresh, c.rpn_bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(c.rpn_batch_size_per_image, c.rpn_positive_fraction)

    def forward(self, features, image_sizes, padded_size, trace=False):
        """Run the head on every level and make proposals.

        Args:
            features: [P2, ..., P6], each (N, D, H_k, W_k).
            image_sizes: [(h, w)] per image, the size before padding (clip boxes to it).
            padded_size: (H, W) of the padded batch (anchor strides come from it).
            trace: also return every step of the proposal layer (inspect, notebooks).

        Returns:
            proposals: list of (R_i, 4) arrays, one per image (training or
                testing top-n, by the module's mode);
            out: dict with the head outputs flattened to the anchors' order,
                "objectness" [(N, H_k*W_k*A)] and "rpn_deltas" [(N, H_k*W_k*A, 4)],
                "anchors" [(H_k*W_k*A, 4)], "head_shapes" [(N, A, H_k, W_k)],
                "proposal_scores" and "proposal_steps" (None unless trace).
        """
        c = self.config
        head_outputs = [self.head(p) for p in features]  # one call per level, shared weights
        shapes = [logits.shape for logits, _ in head_outputs]
        objectness, deltas = zip(*(flatten_head_outputs(l, d) for l, d in head_outputs))
        anchors = self.anchor_generator.anchors_per_level(
            padded_size, [s[-2:] for s in shapes], dtype=features[0].dtype
        )
        top_n = (
            (c.rpn_pre_nms_top_n_train, c.rpn_post_nms_top_n_train)
            if self.training
            else (c.rpn_pre_nms_top_n_test, c.rpn_post_nms_top_n_test)
        )
        proposals, scores, steps = generate_proposals(
            list(objectness),
            list(deltas),
            anchors,
            image_sizes,
            *top_n,
            nms_thresh=c.rpn_nms_thresh,
            score_thresh=c.rpn_score_thresh,
            min_size=c.rpn_min_size,
            box_coder=self.box_coder,
            trace=trace,
        )
        return proposals, {
            "objectness": list(objectness),
            "rpn_deltas": list(deltas),
            "anchors": anchors,
            "head_shapes": shapes,
            "proposal_scores": scores,
            "proposal_steps": steps,
        }

    def loss(self, out, targets, rng):
        """The RPN's losses and their gradients with respect to the head outputs.

        Args:
            out: the dict :meth:`forward` returned.
            targets: one dict per image with "boxes" (G, 4).
            rng: numpy Generator for the anchor sampler.

        Returns:
            losses: {"loss_objectness", "loss_rpn_box_reg"} as floats;
            grads: per level, (d_logits (N, A, H, W), d_deltas (N, 4A, H, W)),
                ready for ``self.head.backward``.
        """
        anchors = np.concatenate(out["anchors"], axis=0)  # (A_total, 4)
        labels, reg_targets = zip(
            *(assign_rpn_targets(anchors, t["boxes"], self.matcher, self.sampler, self.box_coder, rng) for t in targets)
        )
        (obj, box), (d_obj, d_deltas) = losses.rpn_loss(
            np.concatenate(out["objectness"], axis=1),
            np.concatenate(out["rpn_deltas"], axis=1),
            np.stack(labels).astype(np.int64),
            np.stack(reg_targets),
            beta=self.config.rpn_smooth_l1_beta,
        )
        splits = np.cumsum([o.shape[1] for o in out["objectness"]])[:-1]
        grads = [
            unflatten_head_grads(gl, gd, shape)
            for gl, gd, shape in zip(
                np.split(d_obj, splits, axis=1), np.split(d_deltas, splits, axis=1), out["head_shapes"]
            )
        ]
        return {"loss_objectness": obj, "loss_rpn_box_reg": box}, grads
