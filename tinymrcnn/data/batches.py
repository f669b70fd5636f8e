"""Which images a training step sees, and how they are flipped: seeded, so runs repeat.

Every random choice of step ``s`` comes from generators seeded with
``(seed, s)`` (and the worker's rank when several data-parallel workers
share a batch), so a run stopped after N steps and resumed sees exactly what
an uninterrupted run sees at step N + 1.
"""

from __future__ import annotations

import numpy as np


def make_datasets(cfg, image_size: int = 128):
    """The training and held-out sets of a training config (``dataset``, ``num_train_images``,
    ``num_val_images``, ``seed``)."""
    from .shapes import ShapesDataset

    difficulty = "hard" if cfg.dataset == "shapes-hard" else "normal"
    train = ShapesDataset(
        cfg.num_train_images, image_size=image_size, seed=cfg.seed, split="train", difficulty=difficulty
    )
    # The held-out split is fixed (seed 0 of the "val" split) whatever the training seed,
    # so numbers from different runs are comparable.
    val = ShapesDataset.heldout(cfg.num_val_images, image_size=image_size, difficulty=difficulty)
    return train, val


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
