"""coco_evaluate against pycocotools' COCOeval, plus the cases whose answer is known by hand."""

import contextlib
import io

import numpy as np
import pytest
from coco_samples import write_coco

from tinymrcnn.data import CocoDataset, ShapesDataset, export_to_coco
from tinymrcnn.evaluate import bootstrap_ap, coco_evaluate

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def random_predictions(dataset, rng, round_scores=False):
    """Per image: 0-2 jittered copies of each ground truth (soft masks, sometimes the wrong class)
    and 0-4 random rectangles; scores uniform (rounded to 0.1 to create ties)."""
    preds = []
    for i in range(len(dataset)):
        _, t = dataset[i]
        h, w = t["masks"].shape[1:]
        boxes, labels, masks = [], [], []
        for box, label, mask in zip(t["boxes"], t["labels"], t["masks"]):
            for _ in range(rng.integers(0, 3)):
                shift = tuple(rng.integers(-5, 6, size=2))
                masks.append(np.roll(mask, shift, axis=(0, 1)) * rng.uniform(0.3, 1.0))
                boxes.append(box + rng.normal(0, 3, size=4))
                labels.append(label if rng.random() < 0.8 else rng.integers(1, dataset.num_classes + 1))
        for _ in range(rng.integers(0, 5)):
            x1, y1 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
            x2, y2 = min(x1 + rng.uniform(2, 60), w), min(y1 + rng.uniform(2, 60), h)
            m = np.zeros((h, w))
            m[int(y1) : int(y2), int(x1) : int(x2)] = rng.random()
            masks.append(m)
            boxes.append([x1, y1, x2, y2])
            labels.append(rng.integers(1, dataset.num_classes + 1))
        n = len(labels)
        scores = rng.random(n)
        if round_scores:
            scores = np.round(scores, 1)
        preds.append(
            {
                "boxes": np.array(boxes, np.float32).reshape(n, 4),
                "labels": np.array(labels, np.int64),
                "scores": scores.astype(np.float32),
                "masks": np.array(masks, np.float32).reshape(n, h, w),
            }
        )
    return preds


def pycocotools_eval(gt_json, preds, image_ids, iou_type, category_ids):
    """COCOeval on the same predictions: segm results carry only the mask (pycocotools then takes the
    detection's area from it), bbox results only the box, as separate COCO result files would."""
    coco_mod = pytest.importorskip("pycocotools.coco")
    cocoeval_mod = pytest.importorskip("pycocotools.cocoeval")
    mask_utils = pytest.importorskip("pycocotools.mask")
    results = []
    for pred, image_id in zip(preds, image_ids):
        for j, label in enumerate(pred["labels"]):
            det = {"image_id": image_id, "category_id": category_ids[label - 1], "score": float(pred["scores"][j])}
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in pred["boxes"][j])
                det["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                det["segmentation"] = mask_utils.encode(np.asfortranarray((pred["masks"][j] > 0.5).astype(np.uint8)))
            results.append(det)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_mod.COCO(gt_json)
        ev = cocoeval_mod.COCOeval(gt, gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def assert_same_as_cocoeval(ours, ev):
    np.testing.assert_allclose([ours[k] for k in STATS], ev.stats[:6], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours["AR"], ev.stats[8], rtol=0, atol=1e-6)  # AR@100, all areas
    np.testing.assert_allclose(ours["precision"], ev.eval["precision"][..., -1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours["recall"], ev.eval["recall"][..., -1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
@pytest.mark.parametrize(
    "size,difficulty,ties", [(128, "normal", False), (128, "hard", True), (256, "normal", True), (256, "hard", False)]
)
def test_matches_pycocotools_on_shapes(tmp_path, iou_type, size, difficulty, ties):
    ds = ShapesDataset(25, image_size=size, seed=3, split="val", difficulty=difficulty)
    preds = random_predictions(ds, np.random.default_rng(size + ties), round_scores=ties)
    gt_json = export_to_coco(ds, str(tmp_path))  # annotation area = mask pixel count
    ours = coco_evaluate(preds, ds, iou_type=iou_type)
    ev = pycocotools_eval(gt_json, preds, list(range(len(ds))), iou_type, [1, 2, 3])
    assert_same_as_cocoeval(ours, ev)
    assert 0 < ours["AP"] < 1


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools_with_crowd_regions(tmp_path, iou_type, seed):
    """The hand-made COCO file: crowd regions (detections on them are ignored), categories
    with arbitrary ids, an image without annotations, polygons and RLE."""
    path, image_dir = write_coco(str(tmp_path))
    ds = CocoDataset(path, image_dir)
    rng = np.random.default_rng(seed)
    preds = random_predictions(ds, rng)
    for i, pred in enumerate(preds):  # add detections inside the crowd regions
        t = ds.get_target(i)
        for mask, label in zip(t["masks"][t["iscrowd"] == 1], t["labels"][t["iscrowd"] == 1]):
            ys, xs = np.nonzero(mask)
            for _ in range(3):
                y1, x1 = rng.integers(ys.min(), ys.max()), rng.integers(xs.min(), xs.max())
                part = np.zeros_like(mask, dtype=np.float32)
                part[y1 : y1 + rng.integers(3, 12), x1 : x1 + rng.integers(3, 12)] = 1
                part *= mask
                pred["masks"] = np.concatenate([pred["masks"], part[None]])
                pred["boxes"] = np.concatenate([pred["boxes"], [[x1, y1, x1 + 5, y1 + 5]]]).astype(np.float32)
                pred["labels"] = np.append(pred["labels"], label)
                pred["scores"] = np.append(pred["scores"], rng.random()).astype(np.float32)
    ours = coco_evaluate(preds, ds, iou_type=iou_type)
    ev = pycocotools_eval(path, preds, ds.image_ids, iou_type, ds.category_ids)
    assert_same_as_cocoeval(ours, ev)


def _perfect(dataset):
    preds = []
    for i in range(len(dataset)):
        _, t = dataset[i]
        preds.append(
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "scores": np.linspace(1, 0.5, len(t["labels"])),
                "masks": t["masks"].astype(np.float32),
            }
        )
    return preds


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_perfect_predictions_give_ap_one(iou_type):
    ds = ShapesDataset(30, seed=1, difficulty="hard")
    r = coco_evaluate(_perfect(ds), ds, iou_type=iou_type)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "AR"):
        assert r[key] == pytest.approx(1.0, abs=1e-12)
    assert r["APl"] == -1  # no shape is large at 128 px: undefined
    assert r["per_class"] == pytest.approx({"square": 1.0, "circle": 1.0, "triangle": 1.0})
    assert r["precision"].shape == (10, 101, 3, 4) and r["recall"].shape == (10, 3, 4)


def _one_image(gt_masks, labels, iscrowd=None):
    class Tiny:
        class_names = ("thing",)

        def __len__(self):
            return 1

        def __getitem__(self, i):
            masks = np.array(gt_masks, np.uint8)
            from tinymrcnn.data.segmentation import masks_to_boxes

            return None, {
                "boxes": masks_to_boxes(masks),
                "labels": np.array(labels),
                "masks": masks,
                "iscrowd": np.zeros(len(labels)) if iscrowd is None else np.array(iscrowd),
            }

    return Tiny()


def _square(y, x, s, size=64):
    m = np.zeros((size, size), np.float32)
    m[y : y + s, x : x + s] = 1
    return m


def test_known_answers():
    # one object, found once plus a lower-scored duplicate: the duplicate comes after full recall -> AP 1
    ds = _one_image([_square(10, 10, 20)], [1])
    dup = {
        "boxes": np.array([[10, 10, 30, 30]] * 2, np.float32),
        "labels": np.array([1, 1]),
        "scores": np.array([0.9, 0.8]),
        "masks": np.stack([_square(10, 10, 20)] * 2),
    }
    assert coco_evaluate([dup], ds)["AP"] == pytest.approx(1.0)
    # the duplicate scored higher than a false positive elsewhere does not matter; a false positive
    # scored above the match halves the precision at every recall: AP = 0.5
    fp_first = {
        "boxes": np.array([[40, 40, 60, 60], [10, 10, 30, 30]], np.float32),
        "labels": np.array([1, 1]),
        "scores": np.array([0.9, 0.8]),
        "masks": np.stack([_square(40, 40, 20), _square(10, 10, 20)]),
    }
    assert coco_evaluate([fp_first], ds)["AP"] == pytest.approx(0.5, abs=1e-6)
    # no detections: AP 0; no ground truth at all: AP undefined (-1)
    empty = {
        "boxes": np.zeros((0, 4)),
        "labels": np.zeros(0, np.int64),
        "scores": np.zeros(0),
        "masks": np.zeros((0, 64, 64)),
    }
    assert coco_evaluate([empty], ds)["AP"] == 0.0
    with pytest.warns(UserWarning, match="no ground truth"):
        assert coco_evaluate([fp_first], _one_image(np.zeros((0, 64, 64)), []))["AP"] == -1.0


def test_detections_on_a_crowd_region_are_ignored():
    ds = _one_image([_square(10, 10, 20), _square(35, 35, 25)], [1, 1], iscrowd=[0, 1])
    masks = np.stack([_square(10, 10, 20), _square(36, 36, 5), _square(45, 45, 8)])
    pred = {
        "boxes": np.array([[10, 10, 30, 30], [36, 36, 41, 41], [45, 45, 53, 53]], np.float32),
        "labels": np.array([1, 1, 1]),
        "scores": np.array([0.5, 0.9, 0.8]),
        "masks": masks,
    }
    # the two higher-scored detections sit inside the crowd: neither true nor false positives
    assert coco_evaluate([pred], ds)["AP"] == pytest.approx(1.0)
    assert coco_evaluate([pred], ds, iou_type="bbox")["AP"] == pytest.approx(1.0)


def test_bad_predictions_are_named():
    ds = ShapesDataset(2)
    preds = _perfect(ds)
    with pytest.raises(ValueError, match="1 predictions for 2 dataset images"):
        coco_evaluate(preds[:1], ds)
    bad = [preds[0], dict(preds[1], masks=preds[1]["masks"][:, :64])]
    with pytest.raises(ValueError, match=r"predictions\[1\]: masks must have shape"):
        coco_evaluate(bad, ds)
    bad = [preds[0], dict(preds[1], labels=preds[1]["labels"] * 0)]
    with pytest.raises(ValueError, match=r"predictions\[1\]: labels must be in 1..3"):
        coco_evaluate(bad, ds, iou_type="bbox")
    with pytest.raises(ValueError, match="iou_type"):
        coco_evaluate(preds, ds, iou_type="keypoints")


def test_a_held_out_sized_set():
    """300 images with ~15 detections each (mask IoU is one matmul): both IoU types evaluate.

    No assertion on the time it takes: a shared or slow machine would fail it for nothing.
    """
    ds = ShapesDataset(300, seed=2)
    preds = random_predictions(ds, np.random.default_rng(0))
    for iou_type in ("segm", "bbox"):
        result = coco_evaluate(preds, ds, iou_type=iou_type)
        assert 0 < result["AP"] < 1, iou_type


def test_precision_recall_plot(tmp_path):
    from tinymrcnn.viz.pr import plot_precision_recall

    ds = ShapesDataset(20, seed=5)
    result = coco_evaluate(random_predictions(ds, np.random.default_rng(3)), ds)
    fig = plot_precision_recall(result, path=tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 1000
    ax = fig.axes[0]
    assert len(ax.lines) == 2 * (3 + 1)  # 3 classes + their mean, at IoU 0.5 and 0.75
    np.testing.assert_allclose(ax.lines[0].get_ydata(), result["precision"][0, :, 0, 0])


class _Renumbered:
    """A dataset whose image ids are a shuffle of 0..n-1, listed in dataset order (not by id)."""

    def __init__(self, dataset, ids):
        self.dataset, self.ids = dataset, [int(i) for i in ids]
        self.class_names = dataset.class_names
        self.num_classes = dataset.num_classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        return image, {**target, "image_id": self.ids[i]}


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_score_ties_are_broken_by_image_id_as_pycocotools(tmp_path, iou_type):
    """Image ids not in dataset order and exact ties (scores 1.0 and rounded ones): the same as COCOeval,
    and the same whatever order the dataset lists the images in."""
    ds = _Renumbered(ShapesDataset(20, image_size=96, seed=5, split="val"), np.random.default_rng(1).permutation(20))
    preds = random_predictions(ds, np.random.default_rng(7), round_scores=True)
    rng = np.random.default_rng(3)
    for p in preds:  # saturated scores, as a trained model gives in float32
        p["scores"][rng.random(len(p["scores"])) < 0.5] = np.float32(1.0)
    gt_json = export_to_coco(ds, str(tmp_path))
    ours = coco_evaluate(preds, ds, iou_type=iou_type)
    assert_same_as_cocoeval(ours, pycocotools_eval(gt_json, preds, ds.ids, iou_type, [1, 2, 3]))
    reverse = _Renumbered(ShapesDataset(20, image_size=96, seed=5, split="val"), ds.ids)
    reverse.dataset = [ds.dataset[i] for i in range(len(ds))][::-1]
    reverse.ids = ds.ids[::-1]
    again = coco_evaluate(preds[::-1], reverse, iou_type=iou_type)
    np.testing.assert_array_equal(again["precision"], ours["precision"])


class _Resampled:
    """Images ``indices`` of ``dataset`` as a dataset of their own (a drawn-twice image appears twice).

    Image ids are (id rank in the original, position), so coco_evaluate pools
    the copies in the same order as bootstrap_ap does.
    """

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices
        self.class_names = dataset.class_names

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        image, target = self.dataset[int(self.indices[j])]
        return image, {**target, "image_id": (int(self.indices[j]), j)}


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_bootstrap_scores_each_resample_as_an_evaluation_of_it(iou_type):
    """Each bootstrap AP equals coco_evaluate on the resampled images written out as a dataset."""
    ds = ShapesDataset(7, seed=5)
    rng = np.random.default_rng(3)
    runs = {"a": random_predictions(ds, rng, round_scores=True), "b": random_predictions(ds, rng)}
    boot = bootstrap_ap(runs, ds, num_samples=4, seed=11, iou_type=iou_type)
    samples = np.random.default_rng(11).integers(0, len(ds), size=(4, len(ds)))
    assert any(len(set(s.tolist())) < len(ds) for s in samples)  # some image is drawn twice
    for name, preds in runs.items():
        for s, sample in enumerate(samples):
            expected = coco_evaluate([preds[i] for i in sample], _Resampled(ds, sample), iou_type=iou_type)
            for key in ("AP", "AP50", "AP75"):
                assert boot[name][key].shape == (4,)
                assert boot[name][key][s] == pytest.approx(expected[key], abs=1e-12), (name, s, key)
    assert not np.allclose(boot["a"]["AP"], boot["b"]["AP"])
    again = bootstrap_ap({"b": runs["b"]}, ds, num_samples=4, seed=11, iou_type=iou_type)  # alone: same resamples
    np.testing.assert_array_equal(again["b"]["AP75"], boot["b"]["AP75"])


def test_bootstrap_spread_shrinks_with_more_images():
    """The same detector's AP varies less over resamples of 120 images than of 15."""
    ds = ShapesDataset(120, seed=4)
    preds = random_predictions(ds, np.random.default_rng(1))
    small = bootstrap_ap({"r": preds[:15]}, _Resampled(ds, np.arange(15)), num_samples=60)["r"]["AP"]
    large = bootstrap_ap({"r": preds}, ds, num_samples=60)["r"]["AP"]
    assert large.std() < small.std()
    assert abs(large.mean() - coco_evaluate(preds, ds)["AP"]) < 2 * large.std()


def test_bootstrap_refuses_an_empty_dataset_or_no_samples():
    ds = ShapesDataset(2, seed=1)
    preds = random_predictions(ds, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one image and one sample, got 0 image"):
        bootstrap_ap({"r": []}, _Resampled(ds, np.arange(0)))
    with pytest.raises(ValueError, match="num_samples=0"):
        bootstrap_ap({"r": preds}, ds, num_samples=0)
