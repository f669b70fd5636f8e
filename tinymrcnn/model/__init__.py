"""The Mask R-CNN pipeline, one file per stage in the order the data flows."""
