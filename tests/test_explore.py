"""Looking inside a model: named layers' activations, RPN recall, the ground truth x prediction IoU grid."""

import numpy as np
import pytest
from test_model import tiny_config, toy_batch

from tinymrcnn import MaskRCNN
from tinymrcnn.runtime import StageTimer, layer_names, record_layers
from tinymrcnn.viz.explore import (
    draw_activations,
    draw_iou_grid,
    draw_rpn_recall,
    iou_grid,
    recall,
    rpn_boxes,
    rpn_recall,
)


@pytest.fixture(scope="module")
def model_and_image():
    images, targets = toy_batch(n=1, size=64)
    return MaskRCNN(tiny_config(), seed=0), images[0], targets[0]


def test_recall_counts_ground_truth_boxes_with_a_close_box():
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float)
    boxes = np.array([[0, 0, 10, 12], [20, 20, 30, 40], [50, 50, 60, 60]], float)  # IoU 10/12 and 1/2
    assert recall(gt, boxes) == {0.5: 1.0, 0.7: 0.5}
    assert recall(gt, boxes[2:]) == {0.5: 0.0, 0.7: 0.0}
    assert recall(gt, np.zeros((0, 4))) == {0.5: 0.0, 0.7: 0.0}
    assert recall(np.zeros((0, 4)), boxes, thresholds=(0.5,)) == {0.5: 1.0}
    np.testing.assert_allclose(iou_grid(gt, boxes)[:, :2], [[10 / 12, 0], [0, 0.5]])
    assert iou_grid(gt, np.zeros((0, 4))).shape == (2, 0)


def test_record_layers_wraps_from_outside_and_unwraps(model_and_image):
    model, image, _ = model_and_image
    layer1, layer2 = model.backbone.body.layer1, model.backbone.body.layer2
    with record_layers(model, ["backbone.body.layer1", "backbone.body.layer2", "rpn.head.conv"]) as out:
        assert "forward" in layer2.__dict__
        model.predict([image])
    assert not any("forward" in m.__dict__ for m in (layer1, layer2, model.rpn.head.conv))
    assert len(out["backbone.body.layer1"]) == len(out["backbone.body.layer2"]) == 1
    assert len(out["rpn.head.conv"]) == 5  # the RPN head runs once per level
    np.testing.assert_allclose(layer2(out["backbone.body.layer1"][0]), out["backbone.body.layer2"][0])
    with pytest.raises(RuntimeError), record_layers(model, ["backbone.body.layer2"]):
        raise RuntimeError("a failing pass")
    assert "forward" not in layer2.__dict__  # unwrapped on error too
    with pytest.raises(ValueError, match="layer9.*layer1, layer2"):
        with record_layers(model, ["backbone.body.layer9"]):
            pass
    assert "backbone.body.layer2" in layer_names(model) and "rpn.head.conv" in layer_names(model)


def test_record_layers_and_timer_together(model_and_image):
    model, image, _ = model_and_image
    timer = StageTimer()
    stages = [("backbone.body", ("forward",)), ("rpn.head", ("forward",))]
    with timer.watch(model, stages), record_layers(model, ["backbone.body", "rpn.head", "rpn.head"]) as out:
        model.predict([image])
        assert "forward" in model.rpn.head.__dict__
    assert len(out["backbone.body"]) == 1 and len(out["rpn.head"]) == 5  # a name given twice records once
    assert timer.calls == {"backbone.body forward": 1, "rpn.head forward": 5}  # the timer still counts
    assert "forward" not in model.backbone.body.__dict__ and "forward" not in model.rpn.head.__dict__


def test_inspect_returns_activations_refined_anchors_and_recall(model_and_image):
    model, image, target = model_and_image
    info = model.inspect(image, layers=["backbone.body.layer2", "rpn.head.conv"])
    act = info["activations"]
    assert act["backbone.body.layer2"].ndim == 4 and len(act["rpn.head.conv"]) == 5
    assert model.inspect(image)["activations"] == {}
    sets = rpn_boxes(info)
    assert len(sets["refined anchors"]) == len(sets["anchors"])
    # every proposal is one of the refined anchors (the proposal layer only selects among them)
    refined = {tuple(b) for b in np.round(sets["refined anchors"], 3)}
    assert all(tuple(b) in refined for b in np.round(info["proposals"], 3))
    r = rpn_recall(info, target["boxes"])
    assert set(r) == {"anchors", "refined anchors", "proposals", "counts"}
    assert all(0 <= r[s][t] <= 1 for s in sets for t in (0.5, 0.7))
    assert r["counts"]["proposals"] == len(info["proposals"])
    assert r["anchors"][0.5] >= r["anchors"][0.7]


def test_drawings_render(model_and_image, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    model, image, target = model_and_image
    info = model.inspect(image, layers=["backbone.body.layer2"])
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    draw_rpn_recall(axes[0], rpn_recall(info, target["boxes"]))
    res = info["result"]
    names = model.config.class_names
    grid = draw_iou_grid(axes[1], target["boxes"], res["boxes"], target["labels"], res["labels"], res["scores"], names)
    assert grid.shape == (len(target["boxes"]), min(20, len(res["boxes"])))
    fig.savefig(tmp_path / "a.png", dpi=40)
    fig = draw_activations(info["activations"]["backbone.body.layer2"], max_channels=5, columns=4)
    assert sum(ax.get_visible() for ax in fig.axes) == 5
    fig.savefig(tmp_path / "b.png", dpi=40)
    with pytest.raises(ValueError, match="shape"):
        draw_activations(np.zeros((3, 4)))
