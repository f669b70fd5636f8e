"""The toy "shapes" dataset: squares, circles and triangles on a plain background.

As matterport's Mask_RCNN shapes sample defines it: 128 x 128 images with one random
background colour and 1-4 shapes of random colours; each shape's centre is
at least 20 px from the border and its half-size is in [20, 32] px; heavily
overlapping shapes are avoided and the masks account for occlusion.

Choices made here (that definition leaves them open):

* **Determinism.** Image ``i`` is drawn from its own generator seeded with
  ``(seed, split, i)``, so ``ds[i]`` is the same whatever was read before and
  in whatever order; nothing is cached.
* **Splits.** ``split="train"`` and ``split="val"`` feed different numbers
  into the seed, so the two never share an image, whatever ``seed`` either
  uses. The fixed held-out set is ``ShapesDataset.heldout()`` =
  ``ShapesDataset(200, split="val", seed=0)``.
* **Geometry.** Pixel (r, c) is inside a shape when its centre (c + 0.5,
  r + 0.5) is. square: |dx| <= s and |dy| <= s; circle: dx^2 + dy^2 <= s^2;
  triangle (as the original shapes repository): apex (cx, cy - s), base
  corners (cx -+ s / sin 60deg, cy + s). Centres and half-sizes are real
  numbers. Shapes may reach past the border (a centre 20 px in with a
  half-size of 32); their masks are clipped to the image.
* **Other image sizes.** Every length above (the 20 px margin, the half-size
  range, the minimum visible area) is multiplied by ``image_size / 128``.
* **Colours** are whole numbers / 255 (so a PNG stores them exactly); a
  shape's colour differs from the background and from every other shape's
  by at least 64/255 (Euclidean, RGB), so every mask can be seen.
* **Overlap and occlusion.** Shapes are drawn in order, later ones on top.
  A new shape is rejected (and another drawn, up to 50 tries) when its box
  has IoU > ``max_box_iou`` with an earlier shape's box, or when it would
  leave an earlier shape less than ``min_visible`` of its area visible. So
  no instance is ever tiny, and no pixel of the image belongs to a shape
  without a mask. The masks are the *visible* parts, disjoint; the boxes
  are tight around them (x2 = last column + 1, COCO's convention).
* **"hard"**: 3-8 shapes with half-size [8, 20] px (centre >= 10 px from the
  border), box IoU up to 0.5 and as little as 25 % of a shape left visible.

Target of ``ds[i]``: boxes (N, 4) float32 x1, y1, x2, y2; labels (N,) int64 in
1..3 (1 square, 2 circle, 3 triangle); masks (N, H, W) uint8; area (N,)
float32 = mask pixel count (what COCO evaluation calls the annotation's
area); iscrowd (N,) int64 zeros; image_id int = i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .segmentation import masks_to_boxes, polygon_to_mask

SPLITS = {"train": 0, "val": 1}
HELDOUT_SEED = 0


@dataclass(frozen=True)
class Difficulty:
    """Sampling ranges at 128 x 128 (lengths scale with the image size)."""

    min_shapes: int
    max_shapes: int
    margin: float  # minimum distance of a centre from the border
    min_half_size: float
    max_half_size: float
    max_box_iou: float  # reject a shape overlapping an earlier one more than this
    min_visible: float  # ... or leaving one less than this fraction visible
    min_area: float  # pixels a shape must cover inside the image


DIFFICULTIES = {
    "normal": Difficulty(1, 4, 20.0, 20.0, 32.0, max_box_iou=0.3, min_visible=0.4, min_area=100.0),
    "hard": Difficulty(3, 8, 10.0, 8.0, 20.0, max_box_iou=0.5, min_visible=0.25, min_area=40.0),
}

MIN_COLOUR_DISTANCE = 64.0  # in 0..255 units
MAX_TRIES = 50  # attempts per shape before settling for fewer


class ShapesDataset:
    """``num_images`` seeded images; ``ds[i] -> (image (3, H, W) float32 in [0, 1], target)``."""

    class_names = ("square", "circle", "triangle")  # labels 1, 2, 3
    num_classes = 3

    def __init__(
        self, num_images: int, image_size: int = 128, seed: int = 0, split: str = "train", difficulty: str = "normal"
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
        if int(num_images) < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if int(image_size) < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.split = split
        self.difficulty = difficulty

    @classmethod
    def heldout(cls, num_images: int = 200, image_size: int = 128, difficulty: str = "normal"):
        """The fixed held-out set: ``split="val"``, ``seed=0``; disjoint from every train split."""
        return cls(num_images, image_size=image_size, seed=HELDOUT_SEED, split="val", difficulty=difficulty)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int):
        i = int(i)
        if i < 0:
            i += self.num_images
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        image, target = generate_image(rng, self.image_size, DIFFICULTIES[self.difficulty])
        target["image_id"] = i
        return image, target

    def __repr__(self):
        return (
            f"ShapesDataset(num_images={self.num_images}, image_size={self.image_size}, "
            f"seed={self.seed}, split={self.split!r}, difficulty={self.difficulty!r})"
        )


def draw_shape(label: int, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """Rasterise one whole shape (ignoring occlusion) -> (size, size) bool."""
    centres = np.arange(size) + 0.5
    dy, dx = centres[:, None] - cy, centres[None, :] - cx  # (H, 1), (1, W)
    if label == 1:  # square
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if label == 2:  # circle
        return dx**2 + dy**2 <= s**2
    if label == 3:  # triangle, apex up
        half_base = s / np.sin(np.pi / 3)
        corners = [cx, cy - s, cx - half_base, cy + s, cx + half_base, cy + s]
        return polygon_to_mask([corners], size, size).astype(bool)
    raise ValueError(f"unknown shape label {label}")


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with (N, 4) boxes."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _random_colour(rng, avoid: list) -> np.ndarray:
    """A random RGB colour (0..255) at least MIN_COLOUR_DISTANCE from each colour in ``avoid``."""
    best, best_dist = None, -1.0
    for _ in range(100):
        c = rng.integers(0, 256, size=3).astype(np.float64)
        dist = min((np.linalg.norm(c - a) for a in avoid), default=np.inf)
        if dist >= MIN_COLOUR_DISTANCE:
            return c
        if dist > best_dist:
            best, best_dist = c, dist
    return best


def generate_image(rng: np.random.Generator, size: int, d: Difficulty):
    """One image and its target, drawn from ``rng`` (see the module docstring)."""
    k = size / 128.0
    n_wanted = int(rng.integers(d.min_shapes, d.max_shapes + 1))
    background = rng.integers(0, 256, size=3).astype(np.float64)

    owner = np.full((size, size), -1, dtype=np.int64)  # which shape each pixel shows (-1 background)
    labels, full_areas, boxes, colours = [], [], [], []
    tries = 0
    while len(labels) < n_wanted and tries < MAX_TRIES * n_wanted:
        tries += 1
        label = int(rng.integers(1, 4))
        s = rng.uniform(d.min_half_size, d.max_half_size) * k
        cx, cy = rng.uniform(d.margin * k, size - d.margin * k, size=2)
        full = draw_shape(label, cx, cy, s, size)
        area = int(full.sum())
        if area < d.min_area * k * k:
            continue
        box = masks_to_boxes(full[None])[0]
        if labels and _box_iou(box, np.array(boxes)).max() > d.max_box_iou:
            continue
        new_owner = np.where(full, len(labels), owner)
        visible = np.bincount(new_owner[new_owner >= 0], minlength=len(labels) + 1)
        if any(visible[j] < d.min_visible * full_areas[j] for j in range(len(labels))):
            continue  # would hide too much of an earlier shape
        owner = new_owner
        labels.append(label)
        full_areas.append(area)
        boxes.append(box)
        colours.append(_random_colour(rng, [background] + colours))

    # float32 division, as an image reader divides the stored bytes: a PNG round trip is exact
    palette = np.array([background] + colours, dtype=np.float32) / np.float32(255)  # (1 + N, 3)
    image = palette[owner + 1].transpose(2, 0, 1)  # (3, H, W)
    masks = (owner[None] == np.arange(len(labels))[:, None, None]).astype(np.uint8)  # (N, H, W)
    target = {
        "boxes": masks_to_boxes(masks),
        "labels": np.array(labels, dtype=np.int64),
        "masks": masks,
        "area": masks.sum(axis=(1, 2)).astype(np.float32),
        "iscrowd": np.zeros(len(labels), dtype=np.int64),
    }
    return np.ascontiguousarray(image), target
