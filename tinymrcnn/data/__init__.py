"""Datasets: the built-in shapes toy set and COCO-format folders, plus augmentation."""

from .coco import CocoDataset, export_to_coco, save_coco_results
from .shapes import ShapesDataset

__all__ = ["CocoDataset", "ShapesDataset", "export_to_coco", "save_coco_results"]
