"""COCO format: RLE and polygons, CocoDataset reading and its errors, results and export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from coco_samples import coco_dict, write_coco

from tinymrcnn.data import CocoDataset, ShapesDataset, export_to_coco, save_coco_results
from tinymrcnn.data.segmentation import (
    mask_to_box,
    polygon_to_mask,
    rle_compress,
    rle_counts_to_string,
    rle_decode,
    rle_encode,
    rle_string_to_counts,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

# ------------------------------------------------------------------ RLE


def test_rle_hand_example():
    mask = np.array([[0, 1], [1, 1]], np.uint8)  # column-major: 0, 1 | 1, 1
    assert rle_encode(mask) == {"size": [2, 2], "counts": [1, 3]}
    assert rle_encode(np.ones((2, 3)))["counts"] == [0, 6]  # starts with an empty run of zeros
    assert rle_encode(np.zeros((2, 3)))["counts"] == [6]


def test_rle_round_trips():
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 30, size=2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        rle = rle_encode(mask)
        assert sum(rle["counts"]) == h * w
        np.testing.assert_array_equal(rle_decode(rle), mask)
        np.testing.assert_array_equal(rle_decode(rle_compress(rle)), mask)
        assert rle_string_to_counts(rle_counts_to_string(rle["counts"])) == rle["counts"]
    big = [0, 70000, 3, 123456, 1, 1, 99999]  # large and negative differences
    assert rle_string_to_counts(rle_counts_to_string(big)) == big


def test_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for _ in range(100):
        h, w = rng.integers(1, 40, size=2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        ref = mask_utils.encode(np.asfortranarray(mask))
        assert rle_compress(rle_encode(mask))["counts"] == ref["counts"].decode()
        np.testing.assert_array_equal(rle_decode(ref), mask)
        # an uncompressed RLE read by pycocotools gives the same mask
        ref_from_ours = mask_utils.frPyObjects(rle_encode(mask), h, w)
        np.testing.assert_array_equal(mask_utils.decode(ref_from_ours), mask)


def test_rle_bad_counts():
    with pytest.raises(ValueError, match="add up"):
        rle_decode({"size": [2, 2], "counts": [1, 2]})


# ------------------------------------------------------------------ polygons


def test_polygon_rectangle_and_clipping():
    mask = polygon_to_mask([[10, 10, 30, 10, 30, 20, 10, 20]], 40, 50)
    assert mask.dtype == np.uint8 and mask.sum() == 200
    assert mask_to_box(mask).tolist() == [10, 10, 30, 20]
    # a polygon reaching outside the image is clipped to it
    outside = polygon_to_mask([[-10, -10, 20, -10, 20, 5, -10, 5]], 40, 50)
    assert outside.sum() == 20 * 5 and mask_to_box(outside).tolist() == [0, 0, 20, 5]
    assert polygon_to_mask([[60, 60, 70, 60, 70, 70]], 40, 50).sum() == 0


def test_polygon_union_and_even_odd():
    two = polygon_to_mask([[0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]], 8, 8)
    assert two.sum() == 16 + 16 - 4  # several polygons of one object: union
    # a self-overlapping outline (a square traced around twice over a hole) follows even-odd
    ring = [0, 0, 8, 0, 8, 8, 0, 8, 0, 0, 2, 2, 2, 6, 6, 6, 6, 2, 2, 2]
    m = polygon_to_mask([ring], 8, 8)
    assert m.sum() == 64 - 16 and m[2:6, 2:6].sum() == 0


def _distance_to_outline(points, xy):
    a, b = xy, np.roll(xy, -1, axis=0)
    dist = np.full(len(points), np.inf)
    for p, q in zip(a, b):
        t = np.clip(((points - p) @ (q - p)) / max((q - p) @ (q - p), 1e-12), 0, 1)
        dist = np.minimum(dist, np.linalg.norm(points - (p + t[:, None] * (q - p)), axis=1))
    return dist


def test_polygon_matches_pycocotools():
    """Exact on integer axis-aligned polygons; elsewhere only at pixels on the outline.

    pycocotools rounds vertices and outline to a 1/5 px grid and samples
    columns 0.1 px left of the centre, so a pixel whose centre is within
    0.4 px of an edge may go either way.
    """
    mask_utils = pytest.importorskip("pycocotools.mask")

    def reference(polys, h, w):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))

    for polys in (
        [[5, 5, 45, 5, 45, 35, 5, 35]],
        [[50, 5, 70, 5, 70, 45, 60, 45, 60, 15, 50, 15]],
        [[0, 0, 80, 0, 80, 60, 0, 60]],
        [[3, 4, 9, 4, 9, 20, 3, 20], [30, 30, 45, 30, 45, 45, 30, 45]],
    ):
        np.testing.assert_array_equal(polygon_to_mask(polys, 60, 80), reference(polys, 60, 80))
    rng = np.random.default_rng(2)
    for _ in range(200):
        xy = rng.uniform(-5, 45, size=(int(rng.integers(3, 8)), 2))
        ours, ref = polygon_to_mask([xy.ravel().tolist()], 40, 40), reference([xy.ravel().tolist()], 40, 40)
        rows, cols = np.nonzero(ours != ref)
        centres = np.stack([cols + 0.5, rows + 0.5], axis=1)
        assert (_distance_to_outline(centres, xy) < 0.4).all()


# ------------------------------------------------------------------ reading


def test_reads_polygons_rle_crowd_and_empty_images(tmp_path):
    path, image_dir = write_coco(str(tmp_path))
    ds = CocoDataset(path, image_dir)
    assert len(ds) == 3 and ds.image_ids == [2, 5, 9]  # ordered by id
    assert ds.category_ids == [3, 7, 12] and ds.class_names == ("cat", "bird", "dog") and ds.num_classes == 3

    image, t = ds[1]  # id 5: a.png, 60 x 80
    assert image.shape == (3, 60, 80) and image.dtype == np.float32 and t["image_id"] == 5
    assert t["labels"].tolist() == [1, 3, 1, 1]  # cat, dog, cat (crowd), cat
    assert t["iscrowd"].tolist() == [0, 0, 1, 0]
    np.testing.assert_array_equal(t["boxes"][0], [5, 5, 45, 35])  # xywh -> xyxy
    np.testing.assert_array_equal(t["area"], [1200, 500, 21 * 41, 150])
    assert t["masks"].shape == (4, 60, 80) and t["masks"].dtype == np.uint8
    assert t["masks"][0].sum() == 1200 and t["masks"][1].sum() == 500 and t["masks"][2].sum() == 21 * 41
    for box, mask in zip(t["boxes"], t["masks"]):
        np.testing.assert_array_equal(box, mask_to_box(mask))

    image, t = ds[0]  # id 2: grey PNG -> 3 equal channels
    assert image.shape == (3, 50, 50) and (image[0] == image[1]).all() and (image[1] == image[2]).all()
    assert t["masks"][1].sum() == 100 + 225  # two polygons, one object

    image, t = ds[2]  # id 9: JPEG without annotations
    assert image.shape == (3, 40, 70) and 0 <= image.min() and image.max() <= 1
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["masks"].shape == (0, 40, 70)


def test_masks_equal_pycocotools(tmp_path):
    coco_mod = pytest.importorskip("pycocotools.coco")
    path, image_dir = write_coco(str(tmp_path))
    ds, ref = CocoDataset(path, image_dir), coco_mod.COCO(path)
    for i, image_id in enumerate(ds.image_ids):
        anns = ref.loadAnns(ref.getAnnIds(imgIds=[image_id]))
        masks = ds.get_target(i)["masks"]
        assert len(anns) == len(masks)
        for ann, mask in zip(anns, masks):
            np.testing.assert_array_equal(mask, ref.annToMask(ann))


def test_polygon_outside_image_is_clipped_and_wholly_outside_skipped(tmp_path):
    data = coco_dict()
    data["annotations"] += [
        {
            "id": 20,
            "image_id": 9,
            "category_id": 7,
            "bbox": [60, 30, 20, 20],
            "segmentation": [[60, 30, 80, 30, 80, 50, 60, 50]],
        },
        {
            "id": 21,
            "image_id": 9,
            "category_id": 7,
            "bbox": [100, 0, 10, 10],
            "segmentation": [[100, 0, 110, 0, 110, 10, 100, 10]],
        },
    ]
    path, image_dir = write_coco(str(tmp_path), data)
    with pytest.warns(UserWarning, match=r"annotations\[9\] \(id=21\)"):
        ds = CocoDataset(path, image_dir)
    t = ds.get_target(2)
    assert len(t["labels"]) == 1
    np.testing.assert_array_equal(t["boxes"][0], [60, 30, 70, 40])  # clipped to the 40 x 70 image
    assert t["masks"][0].sum() == 10 * 10


def test_round_trip_shapes_export_coco(tmp_path):
    for difficulty in ("normal", "hard"):
        shapes = ShapesDataset(12, seed=3, split="val", difficulty=difficulty)
        out = tmp_path / difficulty
        path = export_to_coco(shapes, str(out))
        coco = CocoDataset(path, str(out / "images"))
        assert len(coco) == 12 and coco.class_names == shapes.class_names and coco.category_ids == [1, 2, 3]
        for i in range(12):
            (ia, ta), (ib, tb) = shapes[i], coco[i]
            np.testing.assert_array_equal(ia, ib)  # 8-bit colours: exact through PNG
            for key in ("boxes", "labels", "masks", "area", "iscrowd", "image_id"):
                np.testing.assert_array_equal(ta[key], tb[key])
                assert np.asarray(ta[key]).dtype == np.asarray(tb[key]).dtype


def test_export_command_line(tmp_path):
    out = tmp_path / "shapes"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tinymrcnn.data",
            "export-shapes",
            str(out),
            "--num-images",
            "3",
            "--split",
            "train",
            "--seed",
            "4",
        ],
        check=True,
        capture_output=True,
    )
    ds = CocoDataset(out / "annotations.json", out / "images")
    np.testing.assert_array_equal(ds[2][0], ShapesDataset(3, seed=4)[2][0])


# ------------------------------------------------------------------ bad input


def _write_bad(tmp_path, mutate):
    data = coco_dict()
    mutate(data)
    return write_coco(str(tmp_path), data, name="bad.json")


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda d: d.pop("categories"), r"bad\.json: missing field 'categories'"),
        (
            lambda d: d["annotations"][1].pop("category_id"),
            r"bad\.json: annotations\[1\] \(id=2\): missing field 'category_id'",
        ),
        (lambda d: d["annotations"][3].pop("segmentation"), r"annotations\[3\] \(id=4\): missing field 'segmentation'"),
        (lambda d: d["annotations"][2].update(category_id=99), r"annotations\[2\] \(id=3\): unknown category id 99"),
        (lambda d: d["annotations"][0].update(image_id=1234), r"annotations\[0\] \(id=1\): image_id 1234 is not in"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\] \(id=1\): bbox must be"),
        (
            lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]),
            r"annotations\[0\] \(id=1\): segmentation polygon 0",
        ),
        (
            lambda d: d["annotations"][3]["segmentation"].update(size=[10, 10]),
            r"annotations\[3\] \(id=4\): RLE size \[10, 10\]",
        ),
        (lambda d: d["annotations"][2]["segmentation"]["counts"].append(5), r"annotations\[2\] \(id=3\): RLE counts"),
        (lambda d: d["images"][1].pop("height"), r"bad\.json: images\[1\]: missing field 'height'"),
        (lambda d: d["categories"].append({"id": 3, "name": "again"}), r"categories\[3\]: duplicate category id 3"),
    ],
)
def test_bad_annotation_files_name_the_file_and_entry(tmp_path, mutate, pattern):
    path, image_dir = _write_bad(tmp_path, mutate)
    with pytest.raises(ValueError, match=pattern):
        CocoDataset(path, image_dir)


def test_missing_image_file_names_file_and_entry(tmp_path):
    path, image_dir = write_coco(str(tmp_path))
    os.remove(os.path.join(image_dir, "grey.png"))
    with pytest.raises(FileNotFoundError, match=r"grey\.png: image file not found \(images\[1\], id=2"):
        CocoDataset(path, image_dir)


def test_image_of_the_wrong_size_and_invalid_json(tmp_path):
    data = coco_dict()
    data["images"][0]["height"] = 61
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 5]
    path, image_dir = write_coco(str(tmp_path), data)
    ds = CocoDataset(path, image_dir)
    with pytest.raises(ValueError, match=r"a\.png: image is 60x80 but .*images\[0\] \(id=5\) says 61x80"):
        ds[1]
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        CocoDataset(bad, image_dir)


# ------------------------------------------------------------------ results


def test_save_coco_results_is_read_by_pycocotools(tmp_path):
    coco_mod = pytest.importorskip("pycocotools.coco")
    mask_utils = pytest.importorskip("pycocotools.mask")
    path, image_dir = write_coco(str(tmp_path))
    ds = CocoDataset(path, image_dir)
    rng = np.random.default_rng(0)
    preds = []
    for i in range(len(ds)):
        t = ds.get_target(i)
        n = 3
        h, w = t["masks"].shape[1:]
        preds.append(
            {
                "boxes": np.sort(rng.uniform(0, min(h, w), (n, 4)), axis=1).astype(np.float32),
                "labels": rng.integers(1, 4, n),
                "scores": rng.random(n).astype(np.float32),
                "masks": rng.random((n, h, w)).astype(np.float32),
            }
        )
    gt = coco_mod.COCO(path)
    for iou_type in ("segm", "bbox"):
        out = tmp_path / f"results_{iou_type}.json"
        written = save_coco_results(preds, ds.image_ids, out, ds.category_ids, iou_type=iou_type)
        assert written == json.loads(out.read_text()) and len(written) == 9
        dets = gt.loadRes(str(out))
        for k, det in enumerate(dets.loadAnns(dets.getAnnIds())):
            i, j = divmod(k, 3)
            assert det["image_id"] == ds.image_ids[i]
            assert det["category_id"] == ds.category_ids[preds[i]["labels"][j] - 1]
            assert det["score"] == pytest.approx(float(preds[i]["scores"][j]))
            if iou_type == "segm":
                np.testing.assert_array_equal(mask_utils.decode(det["segmentation"]), preds[i]["masks"][j] > 0.5)
                assert det["area"] == (preds[i]["masks"][j] > 0.5).sum()
            else:
                x1, y1, x2, y2 = preds[i]["boxes"][j].astype(np.float64)
                np.testing.assert_allclose(det["bbox"], [x1, y1, x2 - x1, y2 - y1])
