"""MaskRCNN: the whole pipeline, forward and explicit backward, top to bottom.

He, Gkioxari, Dollar, Girshick, "Mask R-CNN", ICCV 2017 (arXiv 1703.06870).

Data flow (docs/walkthrough.md#the-nine-steps; one file per stage in this folder):

    images --transform--> batch (N, 3, H, W)
      --backbone--> C2..C5 --fpn--> P2..P6
      --rpn--> proposals (+ RPN losses)
      --roi_heads--> box losses and mask loss          (training)
                 \\-> detections and 28x28 masks       (inference)
      --transform.postprocess--> boxes and masks in the input image

The training step's backward is :meth:`MaskRCNN.backward`: the same stages
in reverse, each stage's hand-written backward, gradients added where
branches meet (the box and mask heads both read P2..P5; the RPN reads
P2..P6). No gradient flows through the proposals or the targets.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
from threadpoolctl import threadpool_limits

from ..checkpoint import load_npz, save_npz_atomic
from ..config import MaskRCNNConfig
from ..nn import Conv2d, ConvTranspose2d, Module
from ..profiling import timed
from .backbone import ResNet
from .fpn import FPN
from .poolers import MultiScaleRoIAlign
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork
from .inputs import check_images, check_targets
from .transform import Transform

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


class Backbone(Module):
    """ResNet body + FPN, named ``body`` and ``fpn`` as in torchvision."""

    def __init__(self, config, rng):
        super().__init__()
        self.body = ResNet(config, rng)
        self.fpn = FPN(self.body.out_channels, config.fpn_channels, rng)

    def forward(self, x):
        return self.fpn(self.body(x))                       # [P2, P3, P4, P5, P6]

    def backward(self, d_levels):
        return self.body.backward(self.fpn.backward(d_levels))


class MaskRCNN(Module):
    """Mask R-CNN with every stage's backward written by hand.

    Args:
        config: a :class:`MaskRCNNConfig` (default: the shapes preset).
            ``config.device == "cuda"`` runs the convolutions and RoIAlign on the
            GPU (docs/gpu.md); without a usable GPU the constructor raises one
            RuntimeError that says why.
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
        self.rng = np.random.default_rng(seed + 1)           # anchor / proposal sampling
        self.timer = None                                    # see set_timer
        if self.config.dtype == "float64":
            self.to_dtype(np.float64)
        self._apply_device()

    def _apply_device(self) -> None:
        """Set ``device`` on every conv layer and RoI pooler from config.device.

        Those are the layers with a GPU path; everything else runs on the CPU
        (docs/gpu.md lists what runs where). "cuda" is checked here, once, so a
        machine without numba.cuda or a GPU fails before any pass.
        """
        device = self.config.device
        if device == "cuda":
            from ..kernels.cuda.device import require_cuda
            try:
                require_cuda()
            except RuntimeError as e:
                raise RuntimeError(
                    f"MaskRCNN with device='cuda': {e} The CPU path is device='cpu' "
                    "(the MaskRCNNConfig field, MaskRCNN.load(path, device='cpu'), or --device cpu)."
                ) from None
        for m in self.modules():
            if isinstance(m, (Conv2d, ConvTranspose2d, MultiScaleRoIAlign)):
                m.device = device

    def set_timer(self, timer) -> None:
        """Report each stage's time to a :class:`tinymrcnn.profiling.StageTimer` (None: off)."""
        self.timer = self.rpn.timer = self.roi_heads.timer = timer

    def _blas_threads(self):
        """Scope the BLAS thread count for one pass (config.blas_threads)."""
        n = self.config.blas_threads
        return nullcontext() if n is None else threadpool_limits(limits=n, user_api="blas")

    @property
    def dtype(self):
        return self.backbone.body.conv1.weight.data.dtype

    # ------------------------------------------------------------------ training
    def forward_train(self, images, targets) -> dict:
        """One forward pass with losses; keeps every cache for :meth:`backward`.

        Returns {loss_objectness, loss_rpn_box_reg, loss_classifier,
        loss_box_reg, loss_mask} as floats (torchvision's names).
        """
        check_images(images, self.config)
        check_targets(images, targets, self.config)
        self.train()
        self.clear_cache()                                    # drop any unfinished step
        with self._blas_threads():
            return self._forward_train(images, targets)

    def _forward_train(self, images, targets) -> dict:
        with timed(self.timer, "transform"):
            x, sizes, targets = self.transform(images, targets, dtype=self.dtype)
            for t in targets:
                t["boxes"] = t["boxes"].astype(self.dtype)
        with timed(self.timer, "backbone"):
            c_feats = self.backbone.body(x)                  # [C2..C5]
        with timed(self.timer, "fpn"):
            features = self.backbone.fpn(c_feats)            # [P2..P6]
        proposals, rpn_losses, _ = self.rpn(features, sizes, x.shape[-2:], targets, self.rng)
        head_losses, _ = self.roi_heads(features[:4], proposals, sizes, targets, self.rng)
        out = {**rpn_losses, **head_losses}
        return {k: out[k] for k in LOSS_NAMES}

    def backward(self) -> None:
        """Backpropagate the sum of the five losses through every stage.

        Order (the reverse of the forward): mask head -> mask RoIAlign, box
        head -> box RoIAlign (inside roi_heads.backward), RPN head on each
        level, FPN, backbone. Parameter gradients accumulate into ``.grad``.
        """
        with self._blas_threads():
            self._backward()

    def _backward(self) -> None:
        d_heads = self.roi_heads.backward()                  # [dP2..dP5] from the box and mask branches
        with timed(self.timer, "backward rpn"):
            d_rpn = self.rpn.backward()                      # [dP2..dP6] from the RPN losses
        d_levels = []
        for k, d in enumerate(d_rpn):
            h = d_heads[k] if k < len(d_heads) else None
            d_levels.append(d if h is None else (h if d is None else d + h))
        with timed(self.timer, "backward fpn"):
            d_c = self.backbone.fpn.backward(d_levels)
        with timed(self.timer, "backward backbone"):
            self.backbone.body.backward(d_c)

    # ------------------------------------------------------------------ inference
    def _run_inference(self, images):
        check_images(images, self.config)
        self.eval()
        with self._blas_threads():
            return self._inference(images)

    def _inference(self, images):
        with timed(self.timer, "transform"):
            x, sizes, _ = self.transform(images, None, dtype=self.dtype)
        with timed(self.timer, "backbone"):
            c_feats = self.backbone.body(x)
        with timed(self.timer, "fpn"):
            features = self.backbone.fpn(c_feats)
        proposals, _, rpn_info = self.rpn(features, sizes, x.shape[-2:])
        detections, head_info = self.roi_heads(features[:4], proposals, sizes)
        with timed(self.timer, "paste masks"):
            results = self.transform.postprocess(detections, sizes, [img.shape[-2:] for img in images])
        return x, sizes, features, proposals, rpn_info, detections, head_info, results

    def predict(self, images) -> list[dict]:
        """Detect and segment: one dict per image with boxes (N, 4), labels (N,)
        in 1..K-1, scores (N,) and masks (N, H, W) probabilities at the image's size.
        Threshold masks at 0.5 for binary masks (:func:`binarize_masks`)."""
        *_, results = self._run_inference(images)
        self.train()
        return results

    def inspect(self, image) -> dict:
        """Every intermediate of one inference pass, for step-through notebooks."""
        x, sizes, features, proposals, rpn_info, detections, head_info, results = self._run_inference([image])
        self.train()
        from .poolers import LevelMapper
        mapper = LevelMapper(self.config.canonical_scale, self.config.canonical_level)
        rois = head_info["rois"]
        return {
            "image": image, "transformed": x[0], "image_size": sizes[0],
            "features": {f"P{k + 2}": f[0] for k, f in enumerate(features)},
            "anchors": rpn_info["anchors"],
            "objectness": [o[0] for o in rpn_info["objectness"]],
            "rpn_deltas": [d[0] for d in rpn_info["rpn_deltas"]],
            "proposal_steps": rpn_info["proposal_steps"],
            "proposals": proposals[0],
            "roi_levels": mapper(rois[:, 1:]) if len(rois) else np.zeros(0, np.int64),
            "class_logits": head_info["class_logits"],
            "box_regression": head_info["box_regression"],
            "detections": detections[0],
            "mask_logits": head_info["mask_logits"],
            "result": results[0],
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
        state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
        model.load_state_dict(state, strict=True)
        if return_extra:
            extra = {k: v for k, v in arrays.items() if not k.startswith("model/")}
            return model, extra, meta
        return model

    @classmethod
    def from_torchvision(cls, state_dict: dict, config: MaskRCNNConfig | None = None, bn_eps: float = 0.0):
        """A model with torchvision's ``maskrcnn_resnet50_fpn`` weights (name -> ndarray).

        See :mod:`tinymrcnn.torchvision_compat` and docs/torchvision.md.
        """
        from ..torchvision_compat import model_from_torchvision
        return model_from_torchvision(state_dict, config=config, bn_eps=bn_eps)


def binarize_masks(masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Probabilities -> uint8 {0, 1} masks (>= 0.5 -> 1; docs/walkthrough.md#8-post-processing)."""
    return (masks >= threshold).astype(np.uint8)
