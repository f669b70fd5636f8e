"""Classes matched by name: a renumbered copy of a COCO file scores the same; unknown names are refused."""

import json
import os

import numpy as np
import pytest
from test_evaluate import random_predictions

from tinymrcnn import MaskRCNNConfig
from tinymrcnn.classes import ClassMismatchError, label_map
from tinymrcnn.data import CocoDataset, ShapesDataset, export_to_coco
from tinymrcnn.train import evaluate_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class _Replay:
    """A stand-in model: its config's class names, and fixed predictions (model labels) per image."""

    def __init__(self, class_names, predictions):
        self.config = MaskRCNNConfig.shapes(num_classes=len(class_names), class_names=tuple(class_names))
        self.predictions, self.calls = predictions, 0

    def predict(self, images):
        out = self.predictions[self.calls : self.calls + len(images)]
        self.calls += len(images)
        return out


def _renumbered_copy(path, new_ids, out):
    """The same COCO file with category ids replaced by new_ids[old id] (so sorted order changes)."""
    data = json.load(open(path))
    for c in data["categories"]:
        c["id"] = new_ids[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = new_ids[a["category_id"]]
    with open(out, "w") as f:
        json.dump(data, f)
    return out


def test_a_renumbered_copy_gives_the_same_ap(tmp_path):
    ds = ShapesDataset(12, image_size=96, seed=2, split="val")
    path = export_to_coco(ds, str(tmp_path))
    moved = _renumbered_copy(path, {1: 7, 2: 3, 3: 5}, str(tmp_path / "renumbered.json"))
    a, b = CocoDataset(path, tmp_path / "images"), CocoDataset(moved, tmp_path / "images")
    assert a.class_names == ("square", "circle", "triangle") and b.class_names == ("circle", "triangle", "square")
    preds = random_predictions(ds, np.random.default_rng(0))  # in the model's labels = shapes' labels
    names = MaskRCNNConfig.shapes().class_names
    ev_a = evaluate_model(_Replay(names, preds), a)
    ev_b = evaluate_model(_Replay(names, preds), b)
    assert ev_a == ev_b
    assert 0 < ev_a["mask_AP"] < 1
    # a model whose classes are listed in another order, predicting the same objects
    order = ("background", "triangle", "square", "circle")
    relabel = np.array([0, 2, 3, 1])  # shapes label -> label in `order`
    moved_preds = [{**p, "labels": relabel[p["labels"]]} for p in preds]
    assert evaluate_model(_Replay(order, moved_preds), b) == ev_a


def test_names_that_do_not_match_are_refused_listing_both(tmp_path):
    ds = ShapesDataset(2, image_size=64, seed=2, split="val")
    path = export_to_coco(ds, str(tmp_path))
    data = json.load(open(path))
    data["categories"][1]["name"] = "disc"
    with open(path, "w") as f:
        json.dump(data, f)
    model = _Replay(MaskRCNNConfig.shapes().class_names, [])
    pattern = (
        r"class names do not match: the dataset .*annotations\.json has categories \['disc'\] that the model "
        r"does not know; model classes: \['square', 'circle', 'triangle'\]; "
        r"dataset categories: \['square', 'disc', 'triangle'\]"
    )
    with pytest.raises(ClassMismatchError, match=pattern):
        evaluate_model(model, CocoDataset(path, tmp_path / "images"))
    assert model.calls == 0  # refused before predicting
    with pytest.raises(ClassMismatchError, match="more than once"):
        label_map(("background", "a", "b"), ("a", "a"))


def test_a_model_may_know_more_classes_than_the_dataset():
    m = label_map(("background", "cat", "dog", "bird"), ("bird", "cat"))
    np.testing.assert_array_equal(m, [0, 2, 0, 1])


def test_cli_evaluate_refuses_mismatched_names(tmp_path, capsys):
    from tinymrcnn.cli import main
    from tinymrcnn.model.mask_rcnn import MaskRCNN

    cfg = MaskRCNNConfig.shapes(stem_channels=8, stage_channels=(8, 8, 8, 8), fpn_channels=8)
    MaskRCNN(cfg, seed=0).save(str(tmp_path / "m.npz"))
    ds = ShapesDataset(1, image_size=64, seed=2, split="val")
    path = export_to_coco(ds, str(tmp_path))
    data = json.load(open(path))
    data["categories"][0]["name"] = "box"
    json.dump(data, open(path, "w"))
    before = sorted(os.listdir(tmp_path))
    rc = main(
        ["evaluate", "--checkpoint", str(tmp_path / "m.npz"), "--coco", path, "--images", str(tmp_path / "images")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("tinymrcnn evaluate: error: argument --coco: the class names do not match:")
    assert "['box']" in err and "model classes: ['square', 'circle', 'triangle']" in err
    assert sorted(os.listdir(tmp_path)) == before
