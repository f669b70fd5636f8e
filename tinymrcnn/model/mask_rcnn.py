"""MaskRCNN: the whole pipeline, forward and explicit backward, top to bottom.

He, Gkioxari, Dollar, Girshick, "Mask R-CNN", ICCV 2017 (arXiv 1703.06870).

Data flow (docs/walkthrough.md#the-nine-steps; one file per stage in this folder):

    images --transform--> batch (N, 3, H, W)
      --backbone--> C2..C5 --fpn--> P2..P6
      --rpn--> proposals (+ RPN losses)
      --roi_heads--> box losses and mask loss          (training)
                 \\-> detections and 28x28 masks       (inference)
      --transform.postprocess--> boxes and masks in the input image

The training step is :meth:`MaskRCNN.forward_train` (the five losses, and
each loss's gradient with respect to the output it scores) followed by
:meth:`MaskRCNN.backward`: the same stages in reverse, each stage's
hand-written backward, gradients added where branches meet (the box and
mask heads both read P2..P5; the RPN reads P2..P6). No gradient flows
through the proposals or the targets.

Nothing here knows about threads, devices or timers: ``tinymrcnn.runtime``
sets those around the calls (and ``tinymrcnn.kernels`` picks CPU or GPU
kernels for the ops every layer calls).
"""

from __future__ import annotations

import numpy as np

from ..checkpoint import load_npz, save_npz_atomic
from ..config import MaskRCNNConfig
from ..nn import Module
from ..ops.boxes import clip_boxes_to_image
from .backbone import ResNet
from .fpn import FPN
from .inputs import check_images, check_targets
from .poolers import LevelMapper
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork
from .transform import Transform

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


class Backbone(Module):
    """ResNet body + FPN, named ``body`` and ``fpn`` as in torchvision."""

    def __init__(self, config, rng):
        super().__init__()
        self.body = ResNet(config, rng)
        self.fpn = FPN(self.body.out_channels, config.fpn_channels, rng)

    def forward(self, x):
        return self.fpn(self.body(x))  # [P2, P3, P4, P5, P6]

    def backward(self, d_levels):
        return self.body.backward(self.fpn.backward(d_levels))


class MaskRCNN(Module):
    """Mask R-CNN with every stage's backward written by hand.

    Args:
        config: a :class:`MaskRCNNConfig` (default: the shapes preset).
        seed: seeds the weight initialisation and the training-time samplers.
    """

    def __init__(self, config: MaskRCNNConfig | None = None, seed: int = 0):
        super().__init__()
        self.config = config if config is not None else MaskRCNNConfig.shapes()
        rng = np.random.default_rng(seed)
        self.transform = Transform(self.config)
        self.backbone = Backbone(self.config, rng)
        self.rpn = RegionProposalNetwork(self.config, rng)
        self.roi_heads = RoIHeads(self.config, rng)
        self.rng = np.random.default_rng(seed + 1)  # anchor / proposal sampling
        self.loss_grads = None  # set by forward_train, used by backward
        if self.config.dtype == "float64":
            self.to_dtype(np.float64)

    @property
    def dtype(self):
        return self.backbone.body.conv1.weight.data.dtype

    # ------------------------------------------------------------------ training
    def forward_train(self, images, targets) -> dict:
        """One forward pass with the five losses; keeps what :meth:`backward` needs.

        Args:
            images: list of (3, H, W) float arrays in [0, 1].
            targets: one dict per image: boxes (G, 4), labels (G,), masks (G, H, W).

        Returns {loss_objectness, loss_rpn_box_reg, loss_classifier,
        loss_box_reg, loss_mask} as floats (torchvision's names).
        """
        check_images(images, self.config)
        check_targets(images, targets, self.config)
        self.train()
        self.clear_cache()  # drop any unfinished step
        x, sizes, targets = self.transform(images, targets, dtype=self.dtype)  # x (N, 3, H, W)
        c_feats = self.backbone.body(x)  # [C2..C5]
        features = self.backbone.fpn(c_feats)  # [P2..P6], (N, D, H/2^k, W/2^k)
        proposals, rpn_out = self.rpn(features, sizes, x.shape[-2:])
        rpn_losses, rpn_grads = self.rpn.loss(rpn_out, targets, self.rng)
        head_losses, head_grads, _ = self.roi_heads.forward_train(features[:4], proposals, targets, self.rng)
        self.loss_grads = {"rpn": rpn_grads, **head_grads}
        out = {**rpn_losses, **head_losses}
        return {k: float(out[k]) for k in LOSS_NAMES}

    def backward(self) -> None:
        """Backpropagate the sum of the five losses through every stage, in reverse.

        Parameter gradients add up in each ``Parameter.grad``. Shapes: R sampled
        RoIs, P mask RoIs, K classes, D FPN channels, A anchors per position.
        """
        g, heads = self.loss_grads, self.roi_heads
        self.loss_grads = None
        # mask branch: (P, K, 28, 28) -> mask head -> (P, D, 14, 14) -> mask pooler -> [dP2..dP5]
        d_mask = heads.mask_roi_pool.backward(heads.mask_head.backward(g["mask_logits"]))
        # box branch: (R, K), (R, 4K) -> predictor -> (R, 1024) -> box head -> (R, D, 7, 7) -> pooler
        d_rep = heads.box_predictor.backward((g["class_logits"], g["box_regression"]))
        d_box = heads.box_roi_pool.backward(heads.box_head.backward(d_rep))
        # RPN head, once per level (shared weights), in reverse order of its forward calls:
        # (N, A, H, W), (N, 4A, H, W) -> (N, D, H, W)
        d_rpn = [None] * len(g["rpn"])
        for k in reversed(range(len(g["rpn"]))):
            d_rpn[k] = self.rpn.head.backward(g["rpn"][k])
        # where the branches meet: P2..P5 feed the RPN and both heads, P6 the RPN only
        d_p = [d_rpn[k] + d_box[k] + d_mask[k] for k in range(len(d_box))] + d_rpn[len(d_box) :]
        d_c = self.backbone.fpn.backward(d_p)  # [dP2..dP6] -> [dC2..dC5]
        self.backbone.body.backward(d_c)  # -> the stem (no image gradient)

    # ------------------------------------------------------------------ inference
    def _inference(self, images, trace=False):
        """One inference pass in eval mode; the model goes back to the mode it was in."""
        check_images(images, self.config)
        was_training = self.training
        self.eval()
        try:
            x, sizes, _ = self.transform(images, None, dtype=self.dtype)
            features = self.backbone(x)
            proposals, rpn_out = self.rpn(features, sizes, x.shape[-2:], trace=trace)
            detections, head_info = self.roi_heads(features[:4], proposals, sizes)
            results = self.transform.postprocess(detections, sizes, [img.shape[-2:] for img in images])
        finally:
            self.train(was_training)
        return x, sizes, features, proposals, rpn_out, detections, head_info, results

    def predict(self, images) -> list[dict]:
        """Detect and segment: one dict per image with boxes (N, 4), labels (N,)
        in 1..K-1, scores (N,) and masks (N, H, W) probabilities at the image's size.
        Threshold masks at 0.5 for binary masks (:func:`binarize_masks`)."""
        return self._inference(images)[-1]

    def inspect(self, image, layers=()) -> dict:
        """Every intermediate of one inference pass, for step-through notebooks.

        layers: dotted names of sub-modules (e.g. "backbone.body.layer2",
        "rpn.head.conv") whose outputs to return under "activations": name ->
        the output, or the list of outputs of a layer that runs once per level.
        They are recorded from outside, by ``runtime.record_layers``.
        """
        from ..runtime import record_layers

        with record_layers(self, layers) as recorded:
            x, sizes, features, proposals, rpn_out, detections, head_info, results = self._inference([image], True)
        mapper = LevelMapper(self.config.canonical_scale, self.config.canonical_level)
        rois = head_info["rois"]
        size = sizes[0]
        refined = [  # every anchor moved by its deltas (the proposal layer's decode + clip, before any top-K)
            clip_boxes_to_image(self.rpn.box_coder.decode(d[0], a), size)
            for d, a in zip(rpn_out["rpn_deltas"], rpn_out["anchors"])
        ]
        return {
            "image": image,
            "transformed": x[0],
            "image_size": sizes[0],
            "features": {f"P{k + 2}": f[0] for k, f in enumerate(features)},
            "anchors": rpn_out["anchors"],
            "objectness": [o[0] for o in rpn_out["objectness"]],
            "rpn_deltas": [d[0] for d in rpn_out["rpn_deltas"]],
            "refined_anchors": refined,
            "proposal_steps": rpn_out["proposal_steps"],
            "proposals": proposals[0],
            "roi_levels": mapper(rois[:, 1:]) if len(rois) else np.zeros(0, np.int64),
            "class_logits": head_info["class_logits"],
            "box_regression": head_info["box_regression"],
            "detections": detections[0],
            "mask_logits": head_info["mask_logits"],
            "result": results[0],
            "activations": {n: outs[0] if len(outs) == 1 else outs for n, outs in recorded.items()},
        }

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str, extra_arrays: dict | None = None, extra_meta: dict | None = None) -> None:
        """Write weights and config to ``path`` (.npz, atomic, no pickle)."""
        arrays = {f"model/{k}": v for k, v in self.state_dict().items()}
        arrays.update(extra_arrays or {})
        meta = {"config": self.config.to_json(), "format": "tinymrcnn-checkpoint-v1"}
        meta.update(extra_meta or {})
        save_npz_atomic(path, arrays, meta)

    @classmethod
    def load(cls, path: str, return_extra: bool = False, device: str | None = None):
        """Rebuild a model from :meth:`save`'s file; checks every name and shape.

        device: "cpu" or "cuda" overrides the saved config's device (None keeps it),
        e.g. to evaluate on a laptop a model trained on a GPU.
        """
        arrays, meta = load_npz(path)
        if meta.get("format") != "tinymrcnn-checkpoint-v1" or "config" not in meta:
            raise ValueError(f"{path} is not a tinymrcnn checkpoint (no config/format entry)")
        config = MaskRCNNConfig.from_json(meta["config"])
        if device is not None:
            config = config.replace(device=device)
        model = cls(config)
        state = {k[len("model/") :]: v for k, v in arrays.items() if k.startswith("model/")}
        model.load_state_dict(state, strict=True)
        if return_extra:
            extra = {k: v for k, v in arrays.items() if not k.startswith("model/")}
            return model, extra, meta
        return model


def binarize_masks(masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Probabilities -> uint8 {0, 1} masks (>= 0.5 -> 1; docs/walkthrough.md#8-post-processing)."""
    return (masks >= threshold).astype(np.uint8)
