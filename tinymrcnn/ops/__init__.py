"""Functional forward/backward pairs: conv, boxes, NMS, RoI pooling, RoIAlign."""
from .boxes import BoxCoder, box_area, box_iou, clip_boxes_to_image, remove_small_boxes
from .nms import batched_nms, nms
