"""Pictures: predictions drawn on images, precision-recall curves, and RoI
pooling versus RoIAlign's sampling (roi.py; the worked example of docs/walkthrough.md)."""
