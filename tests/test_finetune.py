"""Fine-tuning (--init): the class-specific layers start afresh for the new classes, every other tensor is kept."""

import json

import numpy as np
import pytest
from test_faults import cli
from test_torchvision_compat import random_like
from test_train import small_model_config

from tinymrcnn import MaskRCNNConfig
from tinymrcnn import torchvision_compat as tvc
from tinymrcnn.data import ShapesDataset, export_to_coco
from tinymrcnn.finetune import InitError, finetune_config, init_from_checkpoint, is_class_specific
from tinymrcnn.model.mask_rcnn import MaskRCNN
from tinymrcnn.train import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CLASS_SPECIFIC = [
    f"roi_heads.{layer}.{p}"
    for layer in ("box_predictor.cls_score", "box_predictor.bbox_pred", "mask_head.mask_fcn_logits")
    for p in ("weight", "bias")
]


def three_class_coco(folder, names=("square", "circle", "triangle")):
    ds = ShapesDataset(6, image_size=64, seed=4, split="val")
    path = export_to_coco(ds, folder)
    data = json.load(open(path))
    for c, name in zip(data["categories"], names):
        c["name"] = name
    json.dump(data, open(path, "w"))
    return path, f"{folder}/images"


def test_init_from_a_converted_torchvision_model(tmp_path):
    """A randomly initialised torchvision maskrcnn_resnet50_fpn state dict (91 classes, no download, no torch)
    -> convert -> fine-tune on a 3-class dataset: finite losses; kept tensors equal the converted ones."""
    preset = MaskRCNN(MaskRCNNConfig.torchvision_r50_fpn()).state_dict()
    np.savez(tmp_path / "tv.npz", **tvc.to_torchvision_state_dict(random_like(preset), bn_eps=1e-5))
    small = dict(min_size=64, max_size=96, rpn_post_nms_top_n_train=64, box_batch_size_per_image=32)
    converted = tvc.convert_checkpoint(
        str(tmp_path / "tv.npz"), str(tmp_path / "m.npz"), bn_eps=1e-5, **small, mask_batch_size_per_image=4
    ).state_dict()
    path, image_dir = three_class_coco(str(tmp_path / "data"), names=("kiwi", "lime", "plum"))

    model = MaskRCNN(finetune_config(str(tmp_path / "m.npz"), ("background", "kiwi", "lime", "plum")), seed=0)
    lines = []
    report = init_from_checkpoint(model, str(tmp_path / "m.npz"), log=lines.append)
    assert sorted(report["reinitialised"]) == sorted(CLASS_SPECIFIC)
    state = model.state_dict()
    assert state["roi_heads.box_predictor.cls_score.weight"].shape == (4, 1024)
    assert state["roi_heads.mask_head.mask_fcn_logits.weight"].shape == (4, 256, 1, 1)
    assert len(report["kept"]) == len(state) - 6
    for name in report["kept"]:
        np.testing.assert_array_equal(state[name], converted[name], err_msg=name)
    assert (
        "kept 301 tensors (backbone.body 265, backbone.fpn 16, rpn 6, roi_heads.box_head 4, roi_heads.mask_head 10)"
        in lines[0]
        and "re-initialised 6 for the 3 new classes (the checkpoint had 90)" in lines[0]
    )

    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"),
        iters=2,
        batch_size=2,
        workers=1,
        warmup_iters=1,
        log_every=1,
        lr=1e-4,
        init=str(tmp_path / "m.npz"),
        coco_train_json=path,
        coco_train_images=image_dir,
        val_fraction=0.2,
    )
    lines = []
    summary = train(cfg, progress=False, log=lines.append)
    assert all(np.isfinite(r["loss"]) for r in summary["history"]) and len(summary["history"]) == 2
    assert any("initialised from" in line for line in lines), lines
    trained = MaskRCNN.load(summary["checkpoint"])
    assert trained.config.class_names == ("background", "kiwi", "lime", "plum")
    assert trained.config.block == "bottleneck" and trained.config.frozen_stages == 2
    after = trained.state_dict()
    for name in ("backbone.body.conv1.weight", "backbone.body.layer1.0.conv1.weight"):  # frozen: still converted
        np.testing.assert_array_equal(after[name], converted[name])


def test_same_classes_keep_everything_and_other_architectures_are_refused(tmp_path):
    MaskRCNN(small_model_config(), seed=1).save(str(tmp_path / "a.npz"))
    model = MaskRCNN(small_model_config(), seed=2)
    report = init_from_checkpoint(model, str(tmp_path / "a.npz"), log=lambda s: None)
    assert report["reinitialised"] == [] and not any(is_class_specific(n) for n in report["reinitialised"])
    deeper = MaskRCNN(small_model_config().replace(mask_num_convs=2), seed=0)
    with pytest.raises(InitError, match=r"a\.npz is a model of another architecture: the model's .*mask_fcn2.weight"):
        init_from_checkpoint(deeper, str(tmp_path / "a.npz"), log=lambda s: None)
    wider = MaskRCNN(small_model_config().replace(fpn_channels=32), seed=0)
    with pytest.raises(InitError, match=r"a\.npz: .* has shape .* \(a model of another architecture\)"):
        init_from_checkpoint(wider, str(tmp_path / "a.npz"), log=lambda s: None)


def test_cli_init_to_new_classes(tmp_path, capsys, monkeypatch):
    MaskRCNN(small_model_config(), seed=1).save(str(tmp_path / "a.npz"))
    path, image_dir = three_class_coco(str(tmp_path / "data"), names=("kiwi", "lime", "plum"))
    argv = ["train", "--init", tmp_path / "a.npz", "--coco", path, "--images", image_dir, "--out", tmp_path / "run"]
    status, out, err = cli(capsys, *argv, "--iters", 2, "--batch-size", 2, "--workers", 1)
    assert status == 0, err
    assert "classes from the dataset: kiwi, lime, plum" in out
    assert "re-initialised 6 for the 3 new classes (the checkpoint had 3)" in out
    assert "best:" in out
    status, out, err = cli(capsys, "evaluate", "--checkpoint", tmp_path / "run" / "best.npz", "--coco", path,
                           "--images", image_dir)  # fmt: skip
    assert status == 0, err
    assert "mask" in out
    drawn = {}

    def save(image, pred, path, class_names=None, score_thresh=0.5):
        drawn[path] = class_names

    monkeypatch.setattr("tinymrcnn.viz.detections.save_prediction_image", save)
    image = f"{image_dir}/000000.png"
    status, out, err = cli(capsys, "predict", "--checkpoint", tmp_path / "run" / "best.npz", image, "--out", tmp_path)
    assert status == 0, err
    assert list(drawn.values()) == [("background", "kiwi", "lime", "plum")]  # drawings are labelled with the names
