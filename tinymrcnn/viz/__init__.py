"""Pictures: predictions drawn on images, precision-recall curves, and RoI
pooling versus RoIAlign's sampling (roi.py, the blog's section 2)."""
