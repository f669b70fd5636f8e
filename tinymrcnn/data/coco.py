"""COCO-format datasets: read annotations, write results, export the shapes set.

``CocoDataset(annotation_json, image_dir)`` reads the annotation file of the
COCO detection format (https://cocodataset.org/#format-data)::

    {"images":      [{"id", "file_name", "height", "width"}, ...],
     "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h],
                      "segmentation": polygons | RLE, "iscrowd": 0 | 1, "area"}, ...],
     "categories":  [{"id", "name"}, ...]}

and returns items like :class:`~tinymrcnn.data.shapes.ShapesDataset`:
``(image (3, H, W) float32 in [0, 1], target)`` with boxes (N, 4) float32
(x1, y1, x2, y2 = x + w, y + h), labels (N,) int64 in 1..K, masks (N, H, W)
uint8, iscrowd (N,) int64, area (N,) float32 and image_id (the COCO id).

Rules and choices:

* Categories may have any ids; sorted by id they become labels 1..K
  (``category_ids[label - 1]`` is the COCO id, ``class_names[label - 1]`` the name).
* Images are ordered by id (pycocotools' evaluation order).
* ``segmentation`` is a list of polygons, an uncompressed RLE (counts a list,
  as COCO's crowd regions) or a compressed RLE (counts a string); see
  :mod:`tinymrcnn.data.segmentation`. An RLE's size must be the image's.
* Geometry outside the image is clipped: polygons are rasterised only
  inside the image and boxes are clipped to it. An annotation with nothing
  left inside (a box of zero width or height after clipping) is skipped with
  a warning naming it.
* Optional fields: ``iscrowd`` (default 0), ``area`` (default: the mask's
  pixel count), annotation ``id`` (default: its position + 1). Every other
  field above is required; an image without annotations has empty targets.
* Bad input raises ``ValueError`` naming the JSON file and the entry
  (``annotations[3] (id=17)``); a missing image file raises
  ``FileNotFoundError`` naming the file and its ``images[k]`` entry. All of
  it is checked when the dataset is built, except the pixels themselves,
  which are read and decoded in ``__getitem__``.
* Images are read with ``matplotlib.image.imread`` (PNG natively; JPEG and
  others through Pillow). Grey images are repeated to 3 channels, an alpha
  channel is dropped.

``save_coco_results`` writes predictions as a COCO results JSON, and
``export_to_coco`` writes any dataset (the shapes set) as PNGs plus an
annotation file: ``python -m tinymrcnn.data export-shapes OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

from .segmentation import polygon_to_mask, rle_compress, rle_decode, rle_encode


class CocoFormatError(ValueError):
    """An annotation file that cannot be used; the message names the file and the entry."""


class CocoDataset:
    """A COCO annotation file plus its image folder; ``ds[i] -> (image, target)``."""

    def __init__(self, annotation_json, image_dir):
        self.annotation_json = os.fspath(annotation_json)
        self.image_dir = os.fspath(image_dir)
        try:
            with open(self.annotation_json) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise CocoFormatError(f"{self.annotation_json}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise CocoFormatError(f"{self.annotation_json}: not a text (JSON) file ({e})") from None
        if not isinstance(data, dict):
            raise CocoFormatError(f"{self.annotation_json}: the top level must be a JSON object")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise CocoFormatError(f"{self.annotation_json}: missing field {key!r} (a list)")
        self._read_categories(data["categories"])
        self._read_images(data["images"])
        self._read_annotations(data["annotations"])

    # ------------------------------------------------------------- parsing
    def _error(self, where: str, message: str) -> CocoFormatError:
        return CocoFormatError(f"{self.annotation_json}: {where}: {message}")

    def _require(self, entry, where: str, fields) -> None:
        if not isinstance(entry, dict):
            raise self._error(where, "must be a JSON object")
        for name in fields:
            if name not in entry:
                raise self._error(where, f"missing field {name!r}")

    def _read_categories(self, categories) -> None:
        names = {}
        for k, c in enumerate(categories):
            self._require(c, f"categories[{k}]", ("id", "name"))
            if c["id"] in names:
                raise self._error(f"categories[{k}]", f"duplicate category id {c['id']}")
            names[c["id"]] = str(c["name"])
        self.category_ids = sorted(names)  # label l -> category_ids[l - 1]
        self.class_names = tuple(names[i] for i in self.category_ids)
        self.num_classes = len(self.category_ids)
        self.category_id_to_label = {cid: label for label, cid in enumerate(self.category_ids, start=1)}

    def _read_images(self, images) -> None:
        records = {}
        for k, im in enumerate(images):
            where = f"images[{k}]"
            self._require(im, where, ("id", "file_name", "height", "width"))
            if im["id"] in records:
                raise self._error(where, f"duplicate image id {im['id']}")
            h, w = im["height"], im["width"]
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
                raise self._error(f"{where} (id={im['id']})", f"height and width must be positive ints, got {h}, {w}")
            path = os.path.join(self.image_dir, im["file_name"])
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path}: image file not found ({where}, id={im['id']}, "
                    f"file_name={im['file_name']!r} in {self.annotation_json})"
                )
            records[im["id"]] = {"id": im["id"], "path": path, "height": h, "width": w, "where": where}
        self.image_ids = sorted(records)
        self._images = [records[i] for i in self.image_ids]

    def _read_annotations(self, annotations) -> None:
        index = {image_id: k for k, image_id in enumerate(self.image_ids)}
        self._annotations = [[] for _ in self.image_ids]  # per image, in file order
        for k, ann in enumerate(annotations):
            where = f"annotations[{k}]" + (f" (id={ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
            self._require(ann, where, ("image_id", "category_id", "bbox", "segmentation"))
            if ann["image_id"] not in index:
                raise self._error(where, f"image_id {ann['image_id']} is not in 'images'")
            if ann["category_id"] not in self.category_id_to_label:
                raise self._error(where, f"unknown category id {ann['category_id']} (categories: {self.category_ids})")
            image = self._images[index[ann["image_id"]]]
            h, w = image["height"], image["width"]
            bbox = ann["bbox"]
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(isinstance(v, (int, float)) for v in bbox)
                or bbox[2] < 0
                or bbox[3] < 0
            ):
                raise self._error(where, f"bbox must be [x, y, width, height] with width, height >= 0, got {bbox}")
            x1, y1 = min(max(bbox[0], 0), w), min(max(bbox[1], 0), h)  # clipped to the image
            x2, y2 = min(max(bbox[0] + bbox[2], 0), w), min(max(bbox[1] + bbox[3], 0), h)
            if x2 <= x1 or y2 <= y1:
                warnings.warn(
                    f"{self.annotation_json}: {where}: skipped, its box {bbox} has no area inside the {w}x{h} image",
                    stacklevel=3,
                )
                continue
            self._check_segmentation(ann["segmentation"], h, w, where)
            self._annotations[index[ann["image_id"]]].append(
                {
                    "where": where,
                    "box": (x1, y1, x2, y2),
                    "label": self.category_id_to_label[ann["category_id"]],
                    "segmentation": ann["segmentation"],
                    "iscrowd": int(ann.get("iscrowd", 0)),
                    "area": ann.get("area"),
                }
            )

    def _check_segmentation(self, segm, h: int, w: int, where: str) -> None:
        if isinstance(segm, list):
            if not segm:
                raise self._error(where, "segmentation is an empty list of polygons")
            for p, poly in enumerate(segm):
                if (
                    not isinstance(poly, list)
                    or len(poly) < 6
                    or len(poly) % 2
                    or not all(isinstance(v, (int, float)) for v in poly)
                ):
                    raise self._error(where, f"segmentation polygon {p} must be a flat list of at least 3 (x, y) pairs")
        elif isinstance(segm, dict):
            if "size" not in segm or "counts" not in segm:
                raise self._error(where, "RLE segmentation needs 'size' and 'counts'")
            if list(segm["size"]) != [h, w]:
                raise self._error(where, f"RLE size {segm['size']} differs from the image's [{h}, {w}]")
            counts = segm["counts"]
            if isinstance(counts, list):
                if sum(counts) != h * w or any(c < 0 for c in counts):
                    raise self._error(where, f"RLE counts must be non-negative and add up to {h}*{w}")
            elif not isinstance(counts, str):
                raise self._error(where, "RLE counts must be a list of ints or a string")
        else:
            raise self._error(
                where, f"segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}"
            )

    # ------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int):
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        return self.load_image(i), self.get_target(i)

    def load_image(self, i: int) -> np.ndarray:
        """Image ``i`` as (3, H, W) float32 in [0, 1]."""
        rec = self._images[i]
        image = read_image(rec["path"])
        if image.shape[1:] != (rec["height"], rec["width"]):
            raise ValueError(
                f"{rec['path']}: image is {image.shape[1]}x{image.shape[2]} but "
                f"{self.annotation_json} {rec['where']} (id={rec['id']}) says "
                f"{rec['height']}x{rec['width']}"
            )
        return image

    def check_image_files(self) -> None:
        """Check that every image file is an image of the size its entry says, reading only its header.

        Training calls this before it writes anything, so a wrong file is
        found before a run starts rather than at the step that loads it.
        Raises :class:`CocoFormatError` naming the file and its ``images[k]`` entry.
        """
        try:
            from PIL import Image
        except ImportError:  # no Pillow: decode each image (slower, same check)
            for i in range(len(self)):
                try:
                    self.load_image(i)
                except ValueError as e:
                    raise CocoFormatError(str(e)) from None
            return
        for rec in self._images:
            try:
                with Image.open(rec["path"]) as im:
                    w, h = im.size
            except Exception as e:  # Pillow raises many kinds
                raise CocoFormatError(
                    f"{rec['path']}: cannot read the image ({type(e).__name__}: {e}; "
                    f"{self.annotation_json} {rec['where']}, id={rec['id']})"
                ) from None
            if (h, w) != (rec["height"], rec["width"]):
                raise CocoFormatError(
                    f"{rec['path']}: image is {h}x{w} but {self.annotation_json} {rec['where']} "
                    f"(id={rec['id']}) says {rec['height']}x{rec['width']} (height x width)"
                )

    def get_target(self, i: int) -> dict:
        """Target of image ``i`` (decodes the masks; does not read the image)."""
        rec = self._images[i]
        h, w = rec["height"], rec["width"]
        anns = self._annotations[i]
        masks = np.zeros((len(anns), h, w), dtype=np.uint8)
        for j, ann in enumerate(anns):
            try:
                masks[j] = decode_segmentation(ann["segmentation"], h, w)
            except ValueError as e:
                raise self._error(ann["where"], str(e)) from None
        area = [a["area"] if a["area"] is not None else float(m.sum()) for a, m in zip(anns, masks)]
        return {
            "boxes": np.array([a["box"] for a in anns], dtype=np.float32).reshape(-1, 4),
            "labels": np.array([a["label"] for a in anns], dtype=np.int64),
            "masks": masks,
            "area": np.array(area, dtype=np.float32),
            "iscrowd": np.array([a["iscrowd"] for a in anns], dtype=np.int64),
            "image_id": rec["id"],
        }

    def __repr__(self):
        return (
            f"CocoDataset({self.annotation_json!r}, {self.image_dir!r}): {len(self)} images, {self.num_classes} classes"
        )


class CocoSubset:
    """Some images of a :class:`CocoDataset` (a held-out split): the same categories, ids and targets."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.annotation_json = dataset.annotation_json
        self.class_names = dataset.class_names
        self.category_ids = dataset.category_ids
        self.num_classes = dataset.num_classes
        self.image_ids = [dataset.image_ids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def get_target(self, i: int) -> dict:
        return self.dataset.get_target(self.indices[i])

    def __repr__(self):
        return f"CocoSubset({self.dataset!r}, {len(self)} of its images)"


def decode_segmentation(segm, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons or RLE) -> (H, W) uint8 mask."""
    if isinstance(segm, list):
        return polygon_to_mask(segm, height, width)
    return rle_decode(segm)


def read_image(path) -> np.ndarray:
    """Read an image file -> (3, H, W) float32 in [0, 1]."""
    import matplotlib.image

    try:
        arr = matplotlib.image.imread(path)
    except ImportError as e:  # matplotlib reads non-PNG formats through Pillow
        raise ImportError(f"{path}: reading this format needs Pillow (pip install pillow): {e}") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / np.float32(255)
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / np.float32(65535)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:  # grey
        arr = arr[:, :, None]
    if arr.shape[2] in (2, 4):  # drop alpha
        arr = arr[:, :, :-1]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# ---------------------------------------------------------------- writing


def save_coco_results(
    predictions, image_ids, path, category_ids=None, mask_threshold: float = 0.5, iou_type: str = "segm"
) -> list:
    """Write predictions as a COCO results JSON (a list of detections) and return the list.

    predictions: one dict per image (boxes (N, 4) x1 y1 x2 y2, labels (N,) in
    1..K, scores (N,), masks (N, H, W) probabilities); image_ids: the COCO
    image id of each; category_ids: label l -> category_ids[l - 1] (for a
    CocoDataset, ``ds.category_ids``; default: the label itself).

    iou_type "segm" writes each mask (``mask > mask_threshold``) as a
    compressed RLE, "bbox" writes each box as [x, y, w, h]: one file per
    kind, as the COCO evaluation server takes them. (A detection with both a
    box and a mask would make pycocotools use the box's area for the mask's
    small/medium/large range.)
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    if len(predictions) != len(image_ids):
        raise ValueError(f"{len(predictions)} predictions but {len(image_ids)} image ids")
    results = []
    for pred, image_id in zip(predictions, image_ids):
        labels = np.asarray(pred["labels"]).astype(np.int64)
        scores = np.asarray(pred["scores"], dtype=np.float64)
        if iou_type == "bbox":
            boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
        else:
            masks = np.asarray(pred["masks"]) > mask_threshold
        for j, label in enumerate(labels):
            cid = int(label) if category_ids is None else int(category_ids[label - 1])
            det = {"image_id": image_id, "category_id": cid, "score": float(scores[j])}
            if iou_type == "bbox":
                x1, y1, x2, y2 = boxes[j]
                det["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                det["segmentation"] = rle_compress(rle_encode(masks[j]))
            results.append(det)
    with open(path, "w") as f:
        json.dump(results, f)
    return results


def export_to_coco(dataset, out_dir, image_folder: str = "images", annotation_file: str = "annotations.json") -> str:
    """Write ``dataset`` as COCO: ``out_dir/images/<id>.png`` + ``out_dir/annotations.json``.

    Works for any dataset whose items are ``(image, target)`` with boxes,
    labels and masks (area, iscrowd and image_id are used when present).
    Masks are stored as compressed RLE, so reading the folder back with
    :class:`CocoDataset` gives the same targets; images are 8-bit PNGs
    (exact for the shapes set, whose colours are multiples of 1/255).
    Returns the annotation file's path.
    """
    import matplotlib.image

    os.makedirs(os.path.join(out_dir, image_folder), exist_ok=True)
    names = getattr(dataset, "class_names", None)
    category_ids = list(getattr(dataset, "category_ids", None) or range(1, len(names) + 1))
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": int(cid), "name": name} for cid, name in zip(category_ids, names)],
    }
    for i in range(len(dataset)):
        image, target = dataset[i]
        image_id = int(target.get("image_id", i))
        _, h, w = image.shape
        file_name = f"{image_id:06d}.png"
        rgb = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        matplotlib.image.imsave(os.path.join(out_dir, image_folder, file_name), np.ascontiguousarray(rgb))
        coco["images"].append({"id": image_id, "file_name": file_name, "height": int(h), "width": int(w)})
        masks = target["masks"]
        area = target.get("area", masks.sum(axis=(1, 2)))
        iscrowd = target.get("iscrowd", np.zeros(len(masks), np.int64))
        for j, (box, label) in enumerate(zip(target["boxes"], target["labels"])):
            x1, y1, x2, y2 = (float(v) for v in box)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": int(category_ids[int(label) - 1]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(area[j]),
                    "iscrowd": int(iscrowd[j]),
                    "segmentation": rle_compress(rle_encode(masks[j])),
                }
            )
    path = os.path.join(out_dir, annotation_file)
    with open(path, "w") as f:
        json.dump(coco, f)
    return path
