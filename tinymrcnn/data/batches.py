"""Which images a training step sees, and how they are flipped: seeded, so runs repeat.

Every random choice of step ``s`` comes from generators seeded with
``(seed, s)`` (and the worker's rank when several data-parallel workers
share a batch), so a run stopped after N steps and resumed sees exactly what
an uninterrupted run sees at step N + 1.
"""

from __future__ import annotations

import numpy as np


def make_datasets(cfg, class_names=None, image_size: int = 128, check_files: bool = True, log=None):
    """The training and held-out sets of a training config.

    The shapes sets (``dataset``, ``num_train_images``, ``num_val_images``,
    ``seed``), or a COCO-format set (``coco_train_json`` and
    ``coco_train_images``) with its validation set (``coco_val_json`` and
    ``coco_val_images``) or, without one, a held-out fraction
    (``val_fraction``) of the training images: a fixed split, the same for
    every run and seed of one annotation file, said through ``log``.

    class_names: the model's class names (background first); the training
    set is then seen through :class:`TrainingView` (crowd regions dropped,
    labels numbered as the model's classes, matched by name). The held-out
    set keeps its own numbering (evaluation matches names itself).
    check_files: read every image file's header first (sizes, readability),
    so that a bad file is reported before a run writes anything.
    """
    if getattr(cfg, "coco_train_json", None):
        train, val = _coco_datasets(cfg, check_files, log)
    else:
        from .shapes import ShapesDataset

        difficulty = "hard" if cfg.dataset == "shapes-hard" else "normal"
        train = ShapesDataset(
            cfg.num_train_images, image_size=image_size, seed=cfg.seed, split="train", difficulty=difficulty
        )
        # The held-out split is fixed (seed 0 of the "val" split) whatever the training seed,
        # so numbers from different runs are comparable.
        val = ShapesDataset.heldout(cfg.num_val_images, image_size=image_size, difficulty=difficulty)
    if class_names is not None:
        train = TrainingView(train, class_names)
    return train, val


SPLIT_SEED = 20240  # the held-out split of a COCO file depends on the file alone, not on the run's seed


def heldout_split(n_images: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of a set of n_images: a fixed random fraction held out."""
    n_val = min(max(int(round(n_images * fraction)), 1), n_images - 1)
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_images)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _coco_datasets(cfg, check_files: bool, log):
    from .coco import CocoDataset, CocoFormatError, CocoSubset

    full = CocoDataset(cfg.coco_train_json, cfg.coco_train_images)
    if check_files:
        full.check_image_files()
    if cfg.coco_val_json:
        val = CocoDataset(cfg.coco_val_json, cfg.coco_val_images)
        if check_files:
            val.check_image_files()
        if sorted(val.class_names) != sorted(full.class_names):
            raise CocoFormatError(
                f"the validation file {cfg.coco_val_json} names the categories {list(val.class_names)}, "
                f"the training file {cfg.coco_train_json} {list(full.class_names)}; they must be the same names"
            )
        return full, val
    if len(full) < 2:
        raise CocoFormatError(
            f"{cfg.coco_train_json}: {len(full)} image(s); holding out a validation split needs at least 2 "
            "(or give a validation file)"
        )
    train_idx, val_idx = heldout_split(len(full), cfg.val_fraction)
    if log is not None:
        ids = [full.image_ids[i] for i in val_idx]
        shown = ", ".join(str(i) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
        log(
            f"no validation file: {len(val_idx)} of the {len(full)} images of {cfg.coco_train_json} are held out "
            f"for validation (fraction {cfg.val_fraction:g}, a fixed split; image ids {shown})"
        )
    return CocoSubset(full, train_idx), CocoSubset(full, val_idx)


class TrainingView:
    """What training sees of a dataset: crowd regions dropped, labels numbered as the model's classes.

    Crowd regions (``iscrowd=1``) are not training targets (as in torchvision's
    reference training); evaluation counts them as crowds. The dataset's
    categories are matched to the model's classes by name
    (:func:`tinymrcnn.classes.label_map`); a dataset without class names is
    taken to number them as the model.
    """

    def __init__(self, dataset, class_names):
        from ..classes import label_map

        self.dataset = dataset
        names = getattr(dataset, "class_names", None)
        self.to_model = None
        if names is not None:
            to_dataset = label_map(class_names, names, _describe(dataset))
            self.to_model = np.zeros(len(names) + 1, dtype=np.int64)
            for m, d in enumerate(to_dataset):
                if d and not self.to_model[d]:
                    self.to_model[d] = m

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        labels = np.asarray(target["labels"], dtype=np.int64)
        n = len(labels)
        keep = np.asarray(target.get("iscrowd", np.zeros(n)), dtype=bool) == 0
        out = {
            k: (v[keep] if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == n else v) for k, v in target.items()
        }
        if self.to_model is not None:
            out["labels"] = self.to_model[labels[keep]]
        return image, out


def _describe(dataset) -> str:
    path = getattr(dataset, "annotation_json", None)
    return f"the dataset {path}" if path else "the dataset"


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The dataset indices of step ``step``: epochs are seeded permutations."""
    per_epoch = max(n_items // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, 7919, epoch]).permutation(n_items)
    return perm[pos * batch_size : (pos + 1) * batch_size]


def step_seeds(seed: int, step: int, rank: int = 0, n_workers: int = 1) -> tuple[list, list]:
    """Seeds of step ``step``'s flip generator and of the model's samplers.

    With several data-parallel workers (``tinymrcnn/parallel.py``) each worker
    ``rank`` gets its own; with one worker they do not depend on the rank, so
    ``workers=1`` repeats single-process runs exactly.
    """
    tail = [] if n_workers == 1 else [rank]
    return [seed, 104729, step, *tail], [seed, 15485863, step, *tail]


def load_batch(dataset, indices, step: int, seed: int, hflip: bool, rank: int = 0, n_workers: int = 1):
    """The images and targets of ``indices``, each flipped with probability 1/2 if ``hflip``."""
    from .transforms import random_horizontal_flip

    rng = np.random.default_rng(step_seeds(seed, step, rank, n_workers)[0])
    images, targets = [], []
    for i in indices:
        img, tgt = dataset[int(i)]
        if hflip:
            img, tgt = random_horizontal_flip(img, tgt, rng, p=0.5)
        images.append(img)
        targets.append(tgt)
    return images, targets
