"""Pictures: predictions drawn on images, precision-recall curves, RoI pooling versus
RoIAlign's sampling (roi.py; the worked example of docs/walkthrough.md), and a look
inside a model (explore.py: RPN recall, ground truth x prediction IoU grid, layer activations)."""
