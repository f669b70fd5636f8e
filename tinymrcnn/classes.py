"""Classes are matched by name: a model's labels against a dataset's categories.

A model numbers its classes 1..K-1 (``config.class_names[0]`` is the
background); a dataset numbers its categories 1..K' (``dataset.class_names``,
for a COCO file its categories sorted by id). The two numberings need not
agree: a COCO file may list the same categories with other ids, or in
another order. What has to agree is the names. ``label_map`` says which
dataset label each model label is, and refuses, listing both sets, a dataset
with a category the model does not know.
"""

from __future__ import annotations

import numpy as np


class ClassMismatchError(ValueError):
    """The dataset's category names are not among the model's class names."""


def label_map(model_names, dataset_names, what: str = "the dataset") -> np.ndarray:
    """(K,) int64: model label m -> dataset label (1..K'), or 0 for a model class the dataset lacks.

    model_names: the model's ``config.class_names`` (background first).
    dataset_names: the dataset's K' category names (labels 1..K').
    Raises :class:`ClassMismatchError` if a dataset name is not a model class
    or is listed twice; the model may know classes the dataset lacks (their
    detections are left out, as COCOeval leaves out unknown category ids).
    """
    model_names = [str(n) for n in model_names]
    dataset_names = [str(n) for n in dataset_names]
    twice = sorted({n for n in dataset_names if dataset_names.count(n) > 1})
    if twice:
        raise ClassMismatchError(f"{what} names the categories {twice} more than once; category names must be unique")
    known = model_names[1:]
    missing = [n for n in dataset_names if n not in known]
    if missing:
        raise ClassMismatchError(
            f"the class names do not match: {what} has categories {missing} that the model does not know; "
            f"model classes: {known}; dataset categories: {dataset_names}"
        )
    to_dataset = {n: k for k, n in enumerate(dataset_names, start=1)}
    out = np.zeros(len(model_names), dtype=np.int64)
    for m, name in enumerate(model_names):
        if m > 0 and name in to_dataset and name not in model_names[1:m]:  # a repeated model name: its first label
            out[m] = to_dataset[name]
    return out


def to_dataset_labels(predictions: list, mapping: np.ndarray) -> list:
    """Predictions with model labels -> with dataset labels; detections of classes the dataset lacks are dropped."""
    out = []
    for pred in predictions:
        labels = mapping[np.asarray(pred["labels"], dtype=np.int64)]
        keep = labels > 0
        new = {k: (v[keep] if isinstance(v, np.ndarray) and len(v) == len(keep) else v) for k, v in pred.items()}
        new["labels"] = labels[keep]
        out.append(new)
    return out
