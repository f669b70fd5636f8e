"""A small hand-made COCO folder shared by test_coco.py and test_evaluate.py.

Three images (ids 5, 2, 9, listed out of order): an RGB PNG, a grey PNG and
a JPEG without annotations. Categories with arbitrary ids 12, 3, 7. The
annotations use every segmentation spelling: polygons (one object of two
polygons, an L shape), a compressed RLE, and uncompressed RLE crowd
regions. Polygons have integer, axis-aligned edges, so our rasteriser and
pycocotools' give identical masks (the tests check it).
"""

import copy
import json
import os

import numpy as np

from tinymrcnn.data.segmentation import mask_to_box, rle_compress, rle_encode

IMAGES = [  # id, file, height, width
    (5, "a.png", 60, 80),
    (2, "grey.png", 50, 50),
    (9, "c.jpg", 40, 70),
]
CATEGORIES = [{"id": 12, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "bird"}]


def _rect(h, w, y1, y2, x1, x2):
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def _xywh(mask):
    x1, y1, x2, y2 = (float(v) for v in mask_to_box(mask))
    return [x1, y1, x2 - x1, y2 - y1]


def annotations():
    """The annotation list (ids 1..8)."""
    disc = np.zeros((50, 50), np.uint8)
    yy, xx = np.mgrid[:50, :50] + 0.5
    disc[(yy - 22) ** 2 + (xx - 25) ** 2 <= 12**2] = 1
    crowd_a = _rect(60, 80, 35, 56, 5, 46)
    crowd_b = _rect(50, 50, 30, 50, 0, 21)
    enc = rle_encode(crowd_a)
    return [
        {
            "id": 1,
            "image_id": 5,
            "category_id": 3,
            "iscrowd": 0,
            "area": 1200.0,
            "bbox": [5, 5, 40, 30],
            "segmentation": [[5, 5, 45, 5, 45, 35, 5, 35]],
        },
        {
            "id": 2,
            "image_id": 5,
            "category_id": 12,
            "iscrowd": 0,
            "area": 500.0,
            "bbox": [50, 5, 20, 40],
            "segmentation": [[50, 5, 70, 5, 70, 45, 60, 45, 60, 15, 50, 15]],
        },
        {
            "id": 3,
            "image_id": 5,
            "category_id": 3,
            "iscrowd": 1,
            "area": float(crowd_a.sum()),
            "bbox": _xywh(crowd_a),
            "segmentation": enc,
        },
        {
            "id": 4,
            "image_id": 2,
            "category_id": 7,
            "iscrowd": 0,
            "area": float(disc.sum()),
            "bbox": _xywh(disc),
            "segmentation": rle_compress(rle_encode(disc)),
        },
        {
            "id": 5,
            "image_id": 2,
            "category_id": 3,
            "iscrowd": 0,
            "area": 325.0,
            "bbox": [5, 5, 40, 40],
            "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15], [30, 30, 45, 30, 45, 45, 30, 45]],
        },
        {
            "id": 6,
            "image_id": 2,
            "category_id": 7,
            "iscrowd": 1,
            "area": float(crowd_b.sum()),
            "bbox": _xywh(crowd_b),
            "segmentation": rle_encode(crowd_b),
        },
        {
            "id": 7,
            "image_id": 5,
            "category_id": 3,
            "iscrowd": 0,
            "area": 150.0,
            "bbox": [20, 40, 15, 10],
            "segmentation": [[20, 40, 35, 40, 35, 50, 20, 50]],
        },
        {
            "id": 8,
            "image_id": 2,
            "category_id": 12,
            "iscrowd": 0,
            "area": 2400.0,
            "bbox": [0, 0, 50, 48],
            "segmentation": [[0, 0, 50, 0, 50, 48, 0, 48]],
        },
    ]


def write_images(image_dir, images=IMAGES):
    from PIL import Image

    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for _, name, h, w in images:
        if name.startswith("grey"):
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(os.path.join(image_dir, name))
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(image_dir, name))


def coco_dict(anns=None):
    return {
        "images": [{"id": i, "file_name": f, "height": h, "width": w} for i, f, h, w in IMAGES],
        "annotations": annotations() if anns is None else anns,
        "categories": copy.deepcopy(CATEGORIES),
    }


def write_coco(folder, data=None, name="instances.json"):
    """Write images and an annotation file into ``folder``; return (json path, image dir)."""
    image_dir = os.path.join(folder, "images")
    write_images(image_dir)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(coco_dict() if data is None else data, f)
    return path, image_dir
