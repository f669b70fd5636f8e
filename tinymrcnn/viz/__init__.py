"""Pictures: predictions drawn on images, precision-recall curves."""
