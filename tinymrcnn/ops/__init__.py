"""Functional ops: each a readable reference and a fast version, forward and backward.

Convention: ``y = op(inputs..., settings...)`` and ``op_backward(dy, inputs...,
settings...)``: the backward takes the output gradient followed by the
forward's own arguments and returns the gradients of its inputs.
"""

from .boxes import BoxCoder, box_area, box_iou, clip_boxes_to_image, remove_small_boxes
from .conv import conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward
from .nms import batched_nms, nms
from .roi_align import roi_align, roi_align_backward, roi_align_levels, roi_align_levels_backward, roi_feature_maps
from .roi_pool import roi_pool, roi_pool_backward
