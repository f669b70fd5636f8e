"""tinymrcnn: Mask R-CNN from scratch in NumPy + Numba.

The pipeline follows the data: transform -> backbone -> FPN -> RPN (anchors,
head, proposals) -> RoI ops -> box and mask heads -> losses / post-processing.
"""
from .gradcheck import gradcheck

__version__ = "0.1.0"
