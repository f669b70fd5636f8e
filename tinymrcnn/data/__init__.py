"""Datasets: the built-in shapes toy set and COCO-format folders."""
