"""tinymrcnn: Mask R-CNN from scratch in NumPy + Numba.

The pipeline follows the data: transform -> backbone -> FPN -> RPN (anchors,
head, proposals) -> RoI ops -> box and mask heads -> losses / post-processing.
"""

from .gradcheck import gradcheck

__version__ = "0.1.0"


def __getattr__(name):
    # The model pulls in every stage; load it on first use so that importing a
    # single op (tinymrcnn.ops.conv2d) stays quick.
    if name in ("MaskRCNN", "MaskRCNNConfig", "binarize_masks"):
        from .config import MaskRCNNConfig
        from .model.mask_rcnn import MaskRCNN, binarize_masks

        return {"MaskRCNN": MaskRCNN, "MaskRCNNConfig": MaskRCNNConfig, "binarize_masks": binarize_masks}[name]
    raise AttributeError(f"module 'tinymrcnn' has no attribute {name!r}")
