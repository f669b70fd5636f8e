"""Functional forward/backward pairs: conv, boxes, NMS, RoI pooling, RoIAlign."""
