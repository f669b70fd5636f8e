"""Functional forward/backward pairs: conv, boxes, NMS, RoI pooling, RoIAlign."""
from .boxes import BoxCoder, box_area, box_iou, clip_boxes_to_image, remove_small_boxes
from .nms import batched_nms, nms
from .conv import conv2d, conv2d_backward, conv_transpose2d, conv_transpose2d_backward
from .roi_align import ChannelsLast, channels_last, roi_align, roi_align_backward
from .roi_pool import roi_pool, roi_pool_backward
